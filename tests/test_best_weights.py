"""Best weights beside the last ones: kept at the eval with the lowest held-out loss, carried through a resume,
and chosen by `eval.weights` (best | last) where the evaluation loads a model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_models import PAD, D, sign_rows, tiny, write_shard

from models.checkpoint import BEST, load_model, weights_folder
from models.data import load_split
from models.trainer import train
from tinymars.profile import TrainRecipe, load_profile

# A constant, high learning rate on 40 rows: the held-out loss bottoms out at step 6 and rises at step 8
# (0.38 then 0.42 here), so the best weights differ from the last ones.
RECIPE = TrainRecipe(steps=8, batch_size=8, lr=0.03, warmup_steps=0, min_lr_frac=1.0, log_every=2, eval_every=2,
                     seed=5, device="cpu")


class Stop(Exception):
    """Raised from the log callback: a run killed mid-training."""


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("best-shards")
    write_shard(folder / "train.parquet", sign_rows(40, seed=0))
    write_shard(folder / "heldout.parquet", sign_rows(12, seed=1))
    return (load_split([str(folder / "train.parquet")], channel_dim=D),
            load_split([str(folder / "heldout.parquet")], channel_dim=D))


def heldout_curve(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["heldout_loss"] for r in rows if "heldout_loss" in r}


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory):
    """One uninterrupted run, with a copy of the weights taken at every eval (from the log line that follows it)."""
    rows, held = data
    out = tmp_path_factory.mktemp("straight") / "out"
    model = tiny("native")
    at_eval: dict[int, dict[str, torch.Tensor]] = {}

    def log(line: str) -> None:
        if "heldout" in line:
            step = int(line.split()[1].split("/")[0])
            at_eval[step] = {k: v.detach().clone() for k, v in model.state_dict().items()}

    summary = train(model, rows, held, RECIPE, out, PAD, log)
    return out, summary, at_eval


def test_best_weights_are_the_weights_of_the_lowest_heldout_eval(straight) -> None:
    out, summary, at_eval = straight
    curve = heldout_curve(out)
    assert sorted(curve) == sorted(at_eval) == [2, 4, 6, 8]
    want = min(curve, key=curve.get)  # the reference: argmin of the logged held-out losses
    assert want < RECIPE.steps, curve  # this recipe's best is not its last step (the comparison below means something)
    assert summary["best_step"] == want and summary["best_heldout_loss"] == curve[want]
    best = load_file(out / BEST / "model.safetensors")
    assert best.keys() == at_eval[want].keys()
    assert all(torch.equal(best[k], at_eval[want][k]) for k in best)
    last = load_file(out / "model.safetensors")
    assert all(torch.equal(last[k], at_eval[RECIPE.steps][k]) for k in last)
    meta = json.loads((out / "model.json").read_text())
    assert (meta["best_step"], meta["best_heldout_loss"]) == (want, curve[want])
    assert json.loads((out / BEST / "model.json").read_text())["best_step"] == want


def test_a_resumed_run_ends_with_the_same_best(straight, data, tmp_path) -> None:
    """Killed after the step-8 eval, before the step-8 weights are saved: the resume starts from the step-6
    checkpoint and evaluates only step 8, which does not improve, so only the carried best can give step 6."""
    out, summary, _ = straight
    rows, held = data
    cfg = RECIPE.model_copy(update={"checkpoint_every": 2})

    def kill_at_last_step(line: str) -> None:
        if line.startswith(f"step {RECIPE.steps}/"):
            raise Stop

    with pytest.raises(Stop):
        train(tiny("native"), rows, held, cfg, tmp_path / "killed", PAD, kill_at_last_step, ckpt_dir=tmp_path / "ckpt")
    assert not (tmp_path / "killed" / BEST).exists()
    lines: list[str] = []
    resumed = train(tiny("native"), rows, held, cfg, tmp_path / "retry", PAD, lines.append,
                    ckpt_dir=tmp_path / "ckpt", resume=True)
    assert any("resumed from" in line and "at step 6" in line for line in lines)
    assert (resumed["best_step"], resumed["best_heldout_loss"]) == (summary["best_step"], summary["best_heldout_loss"])
    assert (tmp_path / "retry" / BEST / "model.safetensors").read_bytes() == \
        (out / BEST / "model.safetensors").read_bytes()


def test_eval_weights_choice_loads_different_files(straight, data, tmp_path) -> None:
    out, summary, _ = straight
    best_dir, best_label = weights_folder(out, "best")
    last_dir, last_label = weights_folder(out, "last")
    assert (best_dir, last_dir) == (out / BEST, out)
    assert best_label.startswith(f"best (step {summary['best_step']}, held-out loss ") and "of 8 steps" in best_label
    assert last_label == "last"
    a, b = load_model(best_dir).state_dict(), load_model(last_dir).state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a)
    # no held-out rows: no best; 'best' falls back to the last weights and says so
    rows, _ = data
    plain = train(tiny("native"), rows, None, RECIPE.model_copy(update={"steps": 2}), tmp_path / "plain", PAD,
                  lambda _: None)
    assert plain["best_step"] is None and not (tmp_path / "plain" / BEST).exists()
    folder, label = weights_folder(tmp_path / "plain", "best")
    assert folder == tmp_path / "plain" and label.startswith("last (no held-out evaluation")
    with pytest.raises(ValueError, match="weights: 'first' is not one of best, last"):
        weights_folder(out, "first")


def test_the_weights_choice_is_in_the_generate_and_steer_keys() -> None:
    from tasks.generate import generate_key_section
    from tasks.steering import steer_key_section

    best, last = load_profile("tiny"), load_profile("tiny", ["eval.weights=last"])
    assert best.eval.weights == "best"
    assert generate_key_section(best) != generate_key_section(last)
    assert steer_key_section(best) != steer_key_section(last)
    assert best.train.shared() == load_profile("tiny", ["train.parallel_models=2"]).train.shared()


def test_the_report_names_the_weights_the_evaluation_loaded(straight, tmp_path) -> None:
    from tasks.report import evaluated_weights, model_figures

    out, summary, _ = straight
    numbers = model_figures(out)["metrics"]
    for choice in ("best", "last"):
        assert evaluated_weights(numbers, choice, RECIPE.steps) == weights_folder(out, choice)[1]
    assert evaluated_weights(numbers, "best", RECIPE.steps) == \
        f"best (step {summary['best_step']}, held-out loss {summary['best_heldout_loss']:.4f}) of 8 steps"
    assert evaluated_weights({"best_step": None}, "best", 8) == weights_folder(tmp_path, "best")[1]


@pytest.mark.slow
def test_the_iteration_reads_and_reports_the_best_weights(tiny_reference) -> None:
    """The session's tiny run: the steer readout read the native's best weights, the train stages' lineage
    metrics name the best step, and the report says which weights were evaluated."""
    from tinymars.lineage import Lineage

    lin = Lineage(tiny_reference / "lineage.duckdb")
    paths = {a["name"]: Path(a["path"]) for a in lin.query("SELECT name, path FROM artifacts")}
    native = json.loads((paths["train:native"] / "model.json").read_text())
    best = json.loads((paths["train:native"] / BEST / "model.json").read_text())
    assert native["best_step"] is not None
    readout = json.loads((paths["steer"] / "readout.json").read_text())
    assert readout["model"]["weights_sha256"] == best["weights_sha256"]
    metrics = {(m["name"], m["key"]): m["value"] for m in lin.metrics(lin.runs(1)[0]["run_id"])}
    assert metrics[("train:native", "best_step")] == native["best_step"]
    assert metrics[("train:native", "best_heldout_loss")] == pytest.approx(native["best_heldout_loss"])
    report = (paths["report"] / "report.md").read_text()
    line = next(x for x in report.splitlines() if x.startswith("Weights evaluated"))
    assert line.startswith("Weights evaluated (`eval.weights: best`): baseline: best (step ")
    assert f"native: best (step {native['best_step']}, held-out loss {native['best_heldout_loss']:.4f}) of 12 " in line
