"""The science in CI: a positive and a negative end-to-end control of the channel (profile `control`).

`tiny` proves the chain; these runs prove the channel is causal inside the real pipeline. The positive
control (real channels) must have every register hypothesis `supported`; the negative control, the same
iteration with each train row's channel vectors moved to another row (`train.channel_control=permuted`),
must have none. A regression that zeroes, misaligns or reorders the channel vectors between corpus and
model fails the first; a scorer or an eval that finds "effects" without a channel fails the second.
Assertions are on verdict names and on the direction of effects, recomputed here from the generations.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy.stats import binomtest
from test_models import D, sign_rows, write_shard

from app.cli import main
from models.controls import apply_channel_control, derangement, permute_channels
from models.data import load_split
from scorers.register import register_gap
from tinymars.lineage import Lineage
from tinymars.profile import ProfileError, load_profile

DATA_STAGES = ("corpus", "channels", "tokenizer", "pack")
VERDICTS = {"supported", "not supported", "inconclusive"}


# ---- the permutation itself ----------------------------------------------------------------------------
@pytest.mark.parametrize("n", [0, 1, 2, 3, 5, 16, 101])
def test_derangement_is_a_seeded_permutation_without_fixed_points(n: int) -> None:
    for seed in range(5):
        perm = derangement(n, seed)
        assert sorted(perm.tolist()) == list(range(n))
        if n >= 2:
            assert not np.any(perm == np.arange(n)), (n, seed, perm)
        assert np.array_equal(perm, derangement(n, seed))  # a pure function of (n, seed)
    if n >= 5:
        assert len({tuple(derangement(n, seed)) for seed in range(5)}) > 1


@pytest.fixture
def signal_rows(tmp_path: Path):
    """400 rows whose affect valence alone decides the target token (5 when > 0, else 6)."""
    write_shard(tmp_path / "train-00000.parquet", sign_rows(400, seed=0))
    return load_split([tmp_path / "train-00000.parquet"], channel_dim=D)


def _agreement(rows) -> tuple[int, int]:
    """(rows whose valence sign names their target token, rows)."""
    says_plus = rows.channels[:, 1, 0] > 0
    is_plus = np.array([ids[-2] == 5 for ids in rows.input_ids])
    return int((says_plus == is_plus).sum()), len(rows)


def test_permuted_channels_keep_everything_but_the_channel_row_link(signal_rows) -> None:
    rows = signal_rows
    out = permute_channels(rows, seed=3)
    assert out.input_ids is rows.input_ids and out.loss_mask is rows.loss_mask and out.row_id == rows.row_id
    assert out.channels.shape == rows.channels.shape
    # the same vectors, each on another row, and the input is left as it was
    flat = lambda c: sorted(map(tuple, c.reshape(len(c), -1).tolist()))  # noqa: E731
    assert flat(out.channels) == flat(rows.channels)
    assert not np.any(np.all(out.channels == rows.channels, axis=(1, 2)))
    assert _agreement(rows) == (400, 400)
    # what the control is for: after it, the channel says nothing about the target (chance, 1/2)
    k, n = _agreement(out)
    assert binomtest(k, n, 0.5).pvalue > 0.01, (k, n)
    assert binomtest(*_agreement(rows), 0.5).pvalue < 1e-10  # the same test sees the real link


def test_apply_channel_control_follows_the_recipe(signal_rows) -> None:
    real = load_profile("control").train.recipe()
    permuted = load_profile("control", ["train.channel_control=permuted"]).train.recipe()
    assert real.channel_control == "real" and permuted.channel_control == "permuted"
    assert apply_channel_control(signal_rows, real) is signal_rows
    got = apply_channel_control(signal_rows, permuted)
    assert np.array_equal(got.channels, permute_channels(signal_rows, permuted.seed).channels)


def test_channel_control_is_validated_and_part_of_the_train_key() -> None:
    base = load_profile("control").train
    permuted = load_profile("control", ["train.channel_control=permuted"]).train
    assert base.shared() != permuted.shared()  # the train stage's key section (tasks/train.py)
    assert {k: v for k, v in permuted.shared().items() if k != "channel_control"} == \
        {k: v for k, v in base.shared().items() if k != "channel_control"}
    with pytest.raises(ProfileError, match=r"train\.channel_control.*'real'.*'permuted'"):
        load_profile("control", ["train.channel_control=shuffled"])
    # the permutation's code is the train stage's code too: editing it retrains
    from tasks.common import STAGE_SOURCES

    assert "models/controls.py" in STAGE_SOURCES["train"]


# ---- the two controls, end to end --------------------------------------------------------------------
def _stage_dirs(lin: Lineage, run_id: str) -> dict[str, dict[str, Any]]:
    return {s["name"]: {**s, "path": Path(lin.artifact(s["artifact_hash"])["path"])} for s in lin.stages(run_id)}


def _find(stages: dict[str, dict[str, Any]], filename: str) -> Path:
    """The one file of that name among a run's artifacts (whichever stage writes it)."""
    found = [s["path"] / filename for s in stages.values() if (s["path"] / filename).is_file()]
    assert len(found) == 1, (filename, found)
    return found[0]


def _mars_units(generations: Path) -> dict[str, list[float]]:
    """Per register capability, the MARS lexicon gap (+ response minus - response) of each prompt."""
    records = [json.loads(line) for line in generations.read_text().splitlines() if line.strip()]
    pairs: dict[tuple[str, str, str], dict[str, str]] = {}
    for r in records:
        if r["kind"] == "register" and int(r.get("turn") or 0) == 0:
            pairs.setdefault((r["arm"], r["capability"], r["prompt_id"]), {})[r["pole"]] = r["response"]
    units: dict[str, list[float]] = {}
    for (arm, cap, _), pair in sorted(pairs.items()):
        if arm == "ablated":  # channel zeroed, same prompt, greedy: the two poles cannot differ
            assert pair["+"] == pair["-"], pair
        elif arm == "mars":
            units.setdefault(cap, []).append(register_gap(pair["+"], pair["-"], cap))
    return units


@pytest.fixture(scope="module")
def controls(prefect_harness, tmp_path_factory) -> dict[str, dict[str, Any]]:
    """The positive control, then the negative one in the same home (the data stages are shared)."""
    home = tmp_path_factory.mktemp("controls") / "home"
    with pytest.MonkeyPatch.context() as env:
        # One BLAS thread per trainer: the 64-wide model runs as fast on one, and a second thread spin-waits
        # whenever anything else wants a core (the same job, 2 threads on a busy 2-core box: 297 s, 1: 14 s).
        env.setenv("OMP_NUM_THREADS", "1")
        assert main(["run", "--profile", "control", "--home", str(home)]) == 0
        assert main(["run", "--profile", "control", "--home", str(home),
                     "--set", "train.channel_control=permuted"]) == 0
    lin = Lineage(home / "lineage.duckdb")
    runs = sorted(lin.runs(), key=lambda r: r["started_at"])
    assert len(runs) == 2 and all(r["status"] == "completed" for r in runs)
    out = {}
    for control, run in zip(("real", "permuted"), runs, strict=True):
        stages = _stage_dirs(lin, run["run_id"])
        out[control] = {"stages": stages,
                        "scores": json.loads(_find(stages, "scores.json").read_text()),
                        "mars": _mars_units(_find(stages, "generations.jsonl")),
                        "model": json.loads((stages["train:native"]["path"] / "model.json").read_text())}
    return out


def _verdicts(scores: dict[str, Any]) -> dict[str, str]:
    verdicts = {h["id"]: h["verdict"] for h in scores["hypotheses"]}
    assert set(verdicts.values()) <= VERDICTS, verdicts
    return verdicts


def test_controls_share_the_data_and_train_their_own_models(controls) -> None:
    real, permuted = controls["real"]["stages"], controls["permuted"]["stages"]
    for stage in DATA_STAGES:
        assert permuted[stage]["cache_hit"] and permuted[stage]["artifact_hash"] == real[stage]["artifact_hash"]
    assert not permuted["train:native"]["cache_hit"]
    assert permuted["train:native"]["artifact_hash"] != real["train:native"]["artifact_hash"]
    assert controls["real"]["model"]["train_config"]["channel_control"] == "real"
    assert controls["permuted"]["model"]["train_config"]["channel_control"] == "permuted"


def test_positive_control_the_channel_sets_the_register(controls) -> None:
    verdicts = _verdicts(controls["real"]["scores"])
    assert verdicts and all(v == "supported" for v in verdicts.values()), verdicts
    mars = controls["real"]["mars"]
    assert set(mars) == {"affect", "time"}
    for cap, gaps in mars.items():  # the direction, recomputed from the generations: + reads more + than -
        assert sum(g > 0 for g in gaps) > sum(g < 0 for g in gaps), (cap, gaps)


def test_negative_control_permuted_channels_support_nothing(controls) -> None:
    verdicts = _verdicts(controls["permuted"]["scores"])
    assert set(verdicts) == set(_verdicts(controls["real"]["scores"]))
    assert not [h for h, v in verdicts.items() if v == "supported"], verdicts
    # and the effect itself shrinks: the real channel wins more prompts, net of losses, than the permuted one
    for cap, real_gaps in controls["real"]["mars"].items():
        perm_gaps = controls["permuted"]["mars"][cap]
        net = [sum(g > 0 for g in gaps) - sum(g < 0 for g in gaps) for gaps in (real_gaps, perm_gaps)]
        assert net[0] > net[1], (cap, net)
