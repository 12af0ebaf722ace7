"""Architecture benchmark (issue 7 part 5): val_bpb checked independently, the flow's table and plot, CLI errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from app.cli import main
from corpus.pack import pack_rows
from corpus.tokenizer import Tokenizer, train_tokenizer
from models.bench_arch import MAX_STEPS, bench_model, bench_recipe
from models.checkpoint import load_model
from models.data import load_split
from tinymars.profile import TrainRecipe

TEXTS = [("Plan my Sunday?", "Walk Rex by the river, then café au lait at nine."),
         ("Summarise tomorrow.", "Meetings at ten; the report — finally — after lunch."),
         ("Any ideas tonight?", "Cook the Lisbon dish your sister loved: bacalhau, slowly."),
         ("How was the week?", "Long, but the piano lessons went well. Grandmother's waltz!")]


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """A four-row corpus (two held out) tokenized and packed by the real packer."""
    root = tmp_path_factory.mktemp("bpb")
    tok = Tokenizer(train_tokenizer([t for pair in TEXTS for t in pair] * 4, root, 340))
    rows = [{"row_id": f"r{i}", "prompt_id": f"p{i}", "capability": "memory", "kind": "selection",
             "split": "heldout" if i % 2 else "train", "prompt": p, "target": t} for i, (p, t) in enumerate(TEXTS)]
    out = root / "pack"
    out.mkdir()
    meta = pack_rows(rows, {"affect": np.zeros((len(rows), 2), np.float32)}, tok, 64, 100, out)
    split = {s: load_split([out / n for n in meta["shards"][s]]) for s in ("train", "heldout")}
    return tok, rows, meta, split, root


def independent_bpb(model, tok: Tokenizer, rows: list[dict]) -> float:
    """Nats over each held-out target (and eos), one unpadded row at a time / ln 2 / UTF-8 bytes of the raw text."""
    nats, nbytes = 0.0, 0
    for row in rows:
        prompt, target = tok.prompt_ids(row["prompt"]), [*tok.encode(row["target"]), tok.eos_id]
        ids = torch.tensor([prompt + target])
        with torch.no_grad():
            logp = F.log_softmax(model(ids[:, :-1])[0][0].double(), dim=-1)
        for j, token in enumerate(target):  # the token at sequence position len(prompt)+j is predicted at one before
            nats -= float(logp[len(prompt) + j - 1, token])
        nbytes += len(row["target"].encode("utf-8"))
    return nats / math.log(2) / nbytes


@pytest.mark.parametrize("spec", [{"arch": "vocab_graph", "rank": 4, "hops": 2},
                                  {"arch": "baseline", "n_layer": 1, "n_head": 2, "d_model": 16}])
def test_val_bpb_matches_an_independent_computation(packed, spec, tmp_path):
    tok, rows, meta, split, _ = packed
    recipe = TrainRecipe(steps=1, batch_size=2, lr=0.01, warmup_steps=1, weight_decay=0.0, log_every=1,
                         eval_every=1, seed=0)
    cfg = bench_recipe(recipe)
    result = bench_model("m", spec, split["train"], split["heldout"], meta, cfg, tmp_path, budget_s=0.3, eval_points=2)
    assert 1 <= result["steps"] < MAX_STEPS and result["curve"][-1]["train_s"] >= 0.3  # stopped by the budget
    want = independent_bpb(load_model(tmp_path), tok, [r for r in rows if r["split"] == "heldout"])
    assert result["val_bpb"] == pytest.approx(want, rel=1e-5)
    tokens = sum(len(tok.encode(r["target"])) + 1 for r in rows if r["split"] == "heldout")
    assert result["val_loss"] == pytest.approx(want * math.log(2) * sum(
        len(r["target"].encode()) for r in rows if r["split"] == "heldout") / tokens, rel=1e-5)


def test_bench_arch_flow_writes_a_row_per_model_and_the_plot(prefect_harness, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowRunFilter, TaskRunFilter
    from prefect.client.schemas.sorting import ArtifactSort

    from flows.bench_arch import bench_arch

    # profile names, and dict specs (two rounds instead of eight keep the vocabulary-space models quick here)
    models = ["native", "baseline", {"name": "graph", "arch": "vocab_graph", "hops": 2},
              {"name": "conv", "arch": "vocab_conv", "hops": 2}]
    home = tmp_path / "home"
    out = bench_arch(profile="tiny", models=models, minutes=1 / 60, home=str(home), eval_points=2,
                     overrides=["corpus.prompts_per_capability=4", "pack.seq_len=256"])
    names = ["native", "baseline", "graph", "conv"]
    assert [r["model"] for r in out["table"]] == names
    for row in out["table"]:
        assert row["steps"] >= 1 and row["params"] > 0 and row["tok_per_s"] > 0
        assert math.isfinite(row["val_loss"]) and math.isfinite(row["val_bpb"])
    saved = json.loads(Path(out["results"]).read_text())
    assert [m["name"] for m in saved["models"]] == names and saved["profile"] == "tiny"
    assert all(m["curve"] and m["curve"][-1]["val_loss"] == m["val_loss"] for m in saved["models"])
    assert Path(out["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert Path(out["results"]).parent.parent == home / "bench-arch"
    with get_client(sync_client=True) as client:
        key = ArtifactFilter(key=ArtifactFilterKey(any_=["tinymars-bench-arch"]))
        arts = client.read_artifacts(artifact_filter=key,
                                     flow_run_filter=FlowRunFilter(), task_run_filter=TaskRunFilter(),
                                     sort=ArtifactSort.CREATED_DESC, limit=5, offset=0)
    assert arts and arts[0].type == "table"


@pytest.mark.parametrize("argv, message", [
    (["--models", "native,transformerxl", "--minutes", "1"],
     "unknown model 'transformerxl'.*registered architecture .*vocab_conv, vocab_graph"),
    (["--models", "native", "--minutes", "0"], "minutes: 0.0 is not a positive number"),
    (["--models", "native", "--minutes", "-2"], "minutes: -2.0 is not a positive number"),
    (["--models", "native", "--minutes", "nan"], "minutes: nan is not a positive number"),
    (["--models", ",", "--minutes", "1"], "models: give a list of model names"),
    (["--models", "vocab_graph,vocab_graph", "--minutes", "1"], "'vocab_graph' is listed twice"),
    (["--models", "adapter", "--minutes", "1"], "'adapter' cannot be built .*missing 'base'"),
    (["--models", "native", "--minutes", "1", "--eval-points", "0"], "eval_points: 0"),
])
def test_cli_rejects_bad_input_before_any_work(argv, message, tmp_path, capsys):
    home = tmp_path / "home"
    assert main(["bench-arch", "--profile", "tiny", "--home", str(home), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tinymars: error:")
    import re

    assert re.search(message, err), err
    assert not home.exists()  # nothing was started
