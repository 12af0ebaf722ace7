"""One training recipe: the profile's `train` section, the job file and the trainer share one type and its defaults."""

from __future__ import annotations

import json
from pathlib import Path

from test_models import NAMES, PAD, TINY, D, T, V, sign_rows, write_shard

from models.train_cli import make_job, run_job
from tinymars.profile import TrainRecipe, TrainSection, load_profile

MINIMAL = {"name": "m", "corpus": {}, "channels": {"enabled": {"affect": {"dim": 2}}},
           "train": {"steps": 5, "warmup_steps": 1, "models": [{"name": "native", "arch": "native", "n_layer": 1,
                                                                "n_head": 2, "d_model": 16}]}}


def test_profile_and_recipe_defaults_cannot_differ() -> None:
    assert issubclass(TrainSection, TrainRecipe)  # the section IS a recipe: a default exists once
    for name, field in TrainRecipe.model_fields.items():
        assert TrainSection.model_fields[name].default == field.default, name
        assert TrainSection.model_fields[name].annotation == field.annotation, name
    from tinymars.profile import validate_profile

    recipe = validate_profile(json.loads(json.dumps(MINIMAL))).train.recipe()
    assert recipe == TrainRecipe(steps=5, warmup_steps=1)  # every other field: the one default
    assert type(recipe) is TrainRecipe
    assert set(recipe.model_dump()) == set(TrainRecipe.model_fields)


def test_set_train_lr_reaches_the_optimizer_through_one_recipe(tmp_path: Path) -> None:
    """--set train.lr -> validated profile -> TrainSection.recipe() -> job file -> train_cli -> trainer -> AdamW."""
    overrides = ["train.lr=0.0123", "train.warmup_steps=0", "train.steps=2", "train.log_every=1",
                 "train.eval_every=2", "train.batch_size=4", "train.min_lr_frac=0.5"]
    profile = load_profile("tiny", overrides)
    recipe = profile.train.recipe()
    assert recipe.lr == 0.0123
    write_shard(tmp_path / "train-00000.parquet", sign_rows(12, seed=0))
    write_shard(tmp_path / "heldout-00000.parquet", sign_rows(4, seed=1))
    meta = {"vocab_size": V, "seq_len": T, "channel_names": list(NAMES), "channel_dim": D, "pad_id": PAD,
            "shards": {"train": ["train-00000.parquet"], "heldout": ["heldout-00000.parquet"]}}
    job = make_job(recipe, "cpu", 1, {"arch": "native", **TINY}, tmp_path, meta, tmp_path / "out", tmp_path / "w",
                   resume=False)
    job = json.loads(json.dumps(job))  # what the subprocess reads
    assert TrainRecipe.model_validate(job["recipe"]) == recipe.model_copy(update={"device": "cpu"})
    summary = run_job(job)
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    # the lr each step set on AdamW's param groups; no warmup, cosine from lr to lr x min_lr_frac over 2 steps:
    # step 1 at progress 0 (full lr), step 2 at progress 1/2: lr x (0.5 + 0.5 x (1 + cos(pi/2)) / 2) = 0.75 lr
    assert lrs == [0.0123, 0.0123 * 0.75]
    assert summary["train_config"]["lr"] == 0.0123
