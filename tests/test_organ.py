"""The organ experiment: channel subsets per model, their validation and parameter counts, the single-vs-integrated
statistic (checked against scipy and by simulation), and the organ profile end to end on CPU."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import binomtest

from models.architectures import build, build_info, count_params
from scorers.organ import integration_verdict, tost_share
from tinymars.profile import ProfileError, load_profile

KW = {"vocab_size": 300, "seq_len": 32, "channel_names": ("memory", "affect", "time"), "channel_dim": 16}
SPEC = {"arch": "native", "n_layer": 1, "n_head": 2, "d_model": 16, "channel_tokens": 2, "channel_dims": [16, 2, 8]}


def test_subset_model_has_parameters_for_its_channels_only_and_reads_them_from_the_full_tensor():
    full, sub = build(SPEC, **KW, seed=0), build({**SPEC, "channels": ["affect"]}, **KW, seed=0)
    # hand count: the encoder owns D_c x K x M weights per channel, each block's gate one per channel
    missing = (16 + 8) * 2 * 16 + 2 * 1
    assert count_params(full) - count_params(sub) == missing
    assert sub.cfg.channel_names == ("affect",) and sub.encoder.weight.shape == (2, 2, 16)
    chans = torch.randn(3, 3, 16)
    moved = chans.clone()
    moved[:, [0, 2]] = torch.randn(3, 2, 16)  # the channels it does not read
    idx = torch.randint(0, 300, (3, 5))
    assert torch.equal(sub(idx, chans)[0], sub(idx, moved)[0])
    sub.blocks[0].inject.gate.data.fill_(1.0)
    moved[:, 1] += 1.0  # the channel it reads
    assert not torch.allclose(sub(idx, chans)[0], sub(idx, moved)[0])
    again = build(build_info(sub)["spec"], **{k: v for k, v in build_info(sub).items()
                                              if k in ("vocab_size", "seq_len", "channel_names", "channel_dim")})
    assert count_params(again) == count_params(sub) and again.cfg.channel_names == ("affect",)


def test_models_command_counts_subsets():
    from app.commands.models import model_rows

    rows = {r["name"]: r for r in model_rows(load_profile("organ"))}
    assert rows["only-affect"]["channels"] == ["affect"]
    assert rows["only-affect"]["params"] < rows["only-memory"]["params"] < rows["integrated"]["params"]


def _organ_with(change) -> None:
    from tinymars.profile import _read, validate_profile

    _, data = _read("organ")
    change(data)
    validate_profile(data)


def _unknown_channel(d):
    d["train"]["models"][1]["channels"] = ["memory", "bogus"]


def _not_enabled(d):
    del d["channels"]["enabled"]["identity"]


def _on_a_baseline(d):
    d["train"]["models"][7]["channels"] = ["affect"]


def _unread_hypothesis(d):
    d["eval"]["models"] = None
    d["train"]["models"][0]["channels"] = ["affect"]
    d["eval"]["hypotheses"] = [{"id": "m", "capability": "memory", "metric": "dominant", "beats": "ablated"}]


@pytest.mark.parametrize(("change", "message"), [
    (_unknown_channel, r"train\.models\.1\.channels"),
    (_not_enabled, r"train\.models\.2\.channels: \['identity'\] are not in channels\.enabled"),
    (_on_a_baseline, r"channels: a channel subset is for arch 'native', not 'baseline'"),
    (_unread_hypothesis, r"m is about memory, whose channel no evaluated model reads"),
])
def test_subset_validation_names_the_field_and_the_fix(change, message):
    with pytest.raises(ProfileError, match=message):
        _organ_with(change)


def test_tost_matches_scipy_and_verdicts():
    for wins, losses in [(10, 10), (30, 5), (3, 0), (50, 48)]:
        n = wins + losses
        ref = max(binomtest(wins, n, 0.65, alternative="less").pvalue,
                  binomtest(wins, n, 0.35, alternative="greater").pvalue)
        assert tost_share(wins, losses, 0.15) == pytest.approx(ref)
    assert integration_verdict(40, 5, 0.01, 0.15)[0] == "helps"
    assert integration_verdict(5, 40, 0.01, 0.15)[0] == "hurts"
    assert integration_verdict(100, 100, 0.01, 0.15)[0] == "costs nothing"
    assert integration_verdict(3, 2, 0.01, 0.15)[0] == "inconclusive"


def test_verdict_false_positive_rates_on_simulated_nulls():
    """helps/hurts under no difference, and 'costs nothing' at the margin's edge, each at most alpha."""
    rng, alpha, n, sims = np.random.default_rng(0), 0.05, 60, 2000
    wins = rng.binomial(n, 0.5, sims)
    diff = np.mean([integration_verdict(int(w), n - int(w), alpha, 0.15)[0] in ("helps", "hurts") for w in wins])
    edge = rng.binomial(n, 0.65, sims)
    equiv = np.mean([integration_verdict(int(w), n - int(w), alpha, 0.15)[0] == "costs nothing" for w in edge])
    assert diff <= alpha and equiv <= alpha


TEST_SIZES = ["corpus.prompts_per_capability=8", "corpus.conflict_prompts_per_capability=2", "corpus.seed=3",
              "tokenizer.vocab_size=1000", "pack.seq_len=192", "train.steps=4", "train.batch_size=4",
              "train.warmup_steps=1", "train.eval_every=4", "train.log_every=4", "train.eval_rows=16",
              "eval.max_new_tokens=8", "eval.max_prompts_per_capability=2", "eval.max_heldout_rows=16",
              "eval.bootstrap_resamples=200"]


KEPT = ("integrated", "only-memory", "only-affect", "baseline-below", "baseline-above")  # a selection and a register


def _tiny_models() -> list[str]:
    """The organ profile's models at 1 layer x 32 wide, two of its six single-channel natives (CI time: each
    model is a trainer process and a generate stage); the crosstalk matrix still spans all six channels."""
    models = [m for m in load_profile("organ").train.models if m.name in KEPT]
    small = [m.model_dump(exclude_none=True) | ({"n_layer": 1, "n_head": 2, "d_model": 32} if m.arch == "native"
                                                else {}) for m in models]
    return ["train.models=" + json.dumps(small), "eval.models=[only-memory, only-affect]"]


def test_organ_profile_runs_end_to_end(prefect_harness, tmp_path):
    """The shipped organ profile at test sizes: every stage runs, the report has both tables and the heatmap."""
    from flows.iteration import iteration

    t0 = time.perf_counter()
    out = iteration(profile="organ", home=str(tmp_path / "home"), overrides=[*TEST_SIZES, *_tiny_models()])
    print(f"organ end to end: {time.perf_counter() - t0:.1f} s")
    names = [s["name"] for s in out["stages"]]
    assert "generate:only-affect" in names and "score:only-memory" in names and "generate:only-time" not in names
    text = Path(out["report"]).read_text()
    assert "## As one organ: single-channel vs integrated" in text and "## Crosstalk matrix" in text
    for cap in ("memory", "affect"):
        assert f"| {cap} | only-{cap} |" in text
    scores = json.loads((Path(out["report"]).parent / "metrics.json").read_text())
    assert scores["eval_model"] == "integrated"
    html = (Path(out["report"]).parent / "report.html").read_text()
    assert "Crosstalk" in html
