"""The STEER arm: the hook adds exactly its vector to exactly its rows, cached and uncached generation agree,
the arm is built from a readout, and the scorers / report carry STEER next to MARS, TEXT and ABLATED."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from statsmodels.stats.contingency_tables import mcnemar

from models.eval_arms import generate_arms
from models.generate import Sampling, generate
from models.steer_hook import SteerArm, Steering, add_to_residual, choose_layer, load_steer_arm
from tests.test_eval_generate import FakeTok, lively_model

V, D, PAD, EOS, H = 97, 8, 0, 3, 32  # the vocabulary, channel width and model width of lively_model


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return lively_model()


def _block_outputs(model: torch.nn.Module, idx: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    seen: list[torch.Tensor] = []
    handles = [b.register_forward_hook(lambda _m, _a, out: seen.append(out.clone())) for b in model.blocks]
    try:
        logits, _ = model(idx)
    finally:
        for h in handles:
            h.remove()
    return seen, logits


def test_hook_adds_exactly_the_vector_to_its_rows_only(model) -> None:
    idx = torch.randint(5, V, (3, 7), generator=torch.Generator().manual_seed(2))
    base, base_logits = _block_outputs(model, idx)
    vec = torch.randn(3, H, generator=torch.Generator().manual_seed(3))
    vec[1] = 0.0  # row 1 is not steered
    with add_to_residual(model, 1, vec):
        steered, logits = _block_outputs(model, idx)
    # blocks hooked after ours see the steered value; block 1's output is the plain output plus the vector
    assert torch.equal(steered[0], base[0])
    assert torch.equal(steered[1][[0, 2]], base[1][[0, 2]] + vec[[0, 2], None, :])
    assert torch.equal(steered[1][1], base[1][1]) and torch.equal(logits[1], base_logits[1])
    assert not torch.equal(logits[0], base_logits[0]) and not torch.equal(logits[2], base_logits[2])
    # the hook is gone afterwards; zero vectors (multiplier 0) install nothing: bit-identical logits
    assert torch.equal(model(idx)[0], base_logits)
    with add_to_residual(model, 1, torch.zeros(3, H)):
        assert torch.equal(model(idx)[0], base_logits)
    with pytest.raises(ValueError, match="not in 0..1"):
        with add_to_residual(model, 2, vec):
            pass
    with pytest.raises(ValueError, match="do not fit"), add_to_residual(model, 0, vec[:2]):
        model(idx)


def test_steered_generation_is_the_same_with_and_without_the_cache(model) -> None:
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(5, V, (n,), generator=g).tolist() for n in (1, 6, 3, 9, 4)]
    vec = 3.0 * torch.randn(len(prompts), H, generator=g)
    vec[2] = 0.0
    steer = Steering(1, vec)
    plain = generate(model, prompts, None, 8, EOS, PAD, batch_size=2)
    want = generate(model, prompts, None, 8, EOS, PAD, batch_size=2, steer=steer)
    assert want != plain and want[2] == plain[2]  # the steering changes its rows and only those
    assert generate(model, prompts, None, 8, EOS, PAD, batch_size=2, steer=steer, use_cache=False) == want
    assert generate(model, prompts, None, 8, EOS, PAD, batch_size=4, steer=steer, fixed_shape=True,
                    prompt_len=10) == want
    assert generate(model, prompts, None, 8, EOS, PAD, batch_size=1, steer=steer) == want  # vectors follow prompts
    s = Sampling(temperature=1.0, seed=4)
    assert generate(model, prompts, None, 8, EOS, PAD, batch_size=2, steer=steer, sampling=s) == \
        generate(model, prompts, None, 8, EOS, PAD, batch_size=5, steer=steer, sampling=s, use_cache=False)
    with pytest.raises(ValueError, match="steering vectors for"):
        generate(model, prompts, None, 8, EOS, PAD, steer=Steering(1, vec[:2]))


def _readout(tmp_path, norms=(2.0, 4.0, 6.0)):
    from models.steering import save_readout

    g = torch.Generator().manual_seed(5)
    vectors = {i: torch.randn(3, H, generator=g) for i in range(3)}
    save_readout(tmp_path, vectors, {"concepts": ["affect", "time", "ethics"], "method": "diff_means",
                                     "pooling": "last", "model": "native",
                                     "layer_norms": {str(i): n for i, n in enumerate(norms)}})
    return vectors


def test_steer_arm_vectors_from_a_readout(tmp_path) -> None:
    vectors = _readout(tmp_path)
    arm = load_steer_arm(tmp_path, 1, multiplier=0.5)
    assert (arm.layer, arm.layer_norm, arm.method) == (1, 4.0, "diff_means")
    states = [{"affect": {"valence": 0.8, "saliency": 0.5}}, {"ethics": {"caution": -1.0, "category": "privacy"}},
              {"memory": {"salient_item": 1, "text": "x"}}, {"time": {"hour": 23, "weekday": 2}}]
    got = arm.steering(states).vectors
    unit = vectors[1] / vectors[1].norm(dim=1, keepdim=True)
    assert torch.allclose(got[0], 0.5 * 0.8 * 4.0 * unit[0])
    assert torch.allclose(got[1], 0.5 * -1.0 * 4.0 * unit[2])
    assert torch.equal(got[2], torch.zeros(H))  # no concept: no steering
    assert torch.allclose(got[3], 0.5 * -1.0 * 4.0 * unit[1])  # 23:00 is night, the time concept's - pole
    assert torch.allclose(got[0].norm(), torch.tensor(0.5 * 0.8 * 4.0))
    assert not load_steer_arm(tmp_path, 1, multiplier=0.0).steering(states).vectors.any()
    assert arm.covers({"capability": "time"}) and not arm.covers({"capability": "memory"})
    assert arm.describe()["layer"] == 1 and arm.describe()["concepts"] == ["affect", "time", "ethics"]


def test_layer_rule() -> None:
    meta = {"layers": [0, 1, 2, 3]}
    assert choose_layer(2, meta) == (2, "set in the profile")
    assert choose_layer("auto", {**meta, "arm_layer": 1})[0] == 1  # the steer stage's recorded choice
    assert choose_layer("auto", meta)[0] == 2  # a readout without one: the middle read layer
    with pytest.raises(ValueError, match="arm_layer"):
        choose_layer(7, meta)


def _row(rid: str, cap: str, kind: str, state: dict) -> dict:
    return {"row_id": rid, "prompt_id": rid[:8], "capability": cap, "kind": kind, "split": "heldout",
            "prompt": f"Question {rid}?", "pole": "+" if kind != "selection" else None, "text_pole": None,
            "salient_item": 0 if kind == "selection" else None, "items": [], "channel_state": {cap: state}}


def test_generate_arms_steers_only_the_directional_rows(model) -> None:
    rows = [_row("aff-0000-+", "affect", "register", {"valence": 0.9, "saliency": 0.5}),
            _row("mem-0000-a", "memory", "selection", {"salient_item": 0, "text": "x"}),
            _row("aff-0001-+", "affect", "conflict", {"valence": -0.9, "saliency": 0.5})]
    mats = {"affect": np.ones((3, 2), np.float32), "memory": np.ones((3, D), np.float32)}
    g = torch.Generator().manual_seed(6)
    arm = SteerArm(layer=1, directions={"affect": torch.nn.functional.normalize(torch.randn(H, generator=g), dim=0)},
                   layer_norm=10.0, multiplier=1.0, method="diff_means", layer_rule="test")
    recs = generate_arms(model, FakeTok(), rows, mats, ["affect", "memory"], D, [0, 1, 2], ["mars", "ablated", "steer"],
                         6, 4, steer=arm)
    steer = {r["row_id"]: r for r in recs if r["arm"] == "steer"}
    ablated = {r["row_id"]: r for r in recs if r["arm"] == "ablated"}
    assert sorted(steer) == ["aff-0000-+", "aff-0001-+"]  # no selection row for STEER
    assert all(r["prompt"] == ablated[rid]["prompt"] and r["channel"] == "zeroed" for rid, r in steer.items())
    assert any(r["response"] != ablated[rid]["response"] for rid, r in steer.items())
    with pytest.raises(ValueError, match="needs the steering readout"):
        generate_arms(model, FakeTok(), rows, mats, ["affect", "memory"], D, [0], ["mars", "ablated", "steer"], 2, 4)


# ---------------------------------------------------------------- scorers and report

WARM, COLD, FLAT = "Happy to help, lovely!", "Sigh, how tedious.", "Here is the plan."
SELECTION_ITEMS = [{"text": "Rex the beagle", "keys": ["Rex", "beagle"]}, {"text": "Lisbon", "keys": ["Lisbon"]},
                   {"text": "piano", "keys": ["piano"]}]


def _rec(rid: str, pid: str, cap: str, kind: str, arm: str, pole: str | None, response: str) -> dict:
    return {"row_id": rid, "prompt_id": pid, "capability": cap, "kind": kind, "arm": arm, "turn": 0,
            "channel": "real" if arm == "mars" else "zeroed", "pole": pole,
            "text_pole": ("-" if pole == "+" else "+") if kind == "conflict" else None,
            "salient_item": 0 if kind == "selection" else None,
            "items": SELECTION_ITEMS if kind == "selection" else [], "channel_state": {}, "prompt": "q",
            "response": response, "prompt_tokens": 10, "response_tokens": 5}


def synthetic_generations() -> list[dict]:
    """Affect register pairs: STEER directional on 7 of 10 prompts, ABLATED on 1, MARS on 9; a few conflict and
    selection rows (selection has no STEER records)."""
    recs = []
    outcome = {"mars": [True] * 9 + [False], "ablated": [True] + [False] * 9, "text": [True] * 5 + [False] * 5,
               "steer": [True] * 7 + [False] * 3}
    for arm, wins in outcome.items():
        for i, win in enumerate(wins):
            pid = f"aff-{i:04d}"
            plus, minus = (WARM, COLD) if win else (FLAT, FLAT)
            recs += [_rec(f"{pid}-+", pid, "affect", "register", arm, "+", plus),
                     _rec(f"{pid}--", pid, "affect", "register", arm, "-", minus)]
        for i in range(4):
            pid = f"affc-{i:04d}"
            pole = "+" if i % 2 == 0 else "-"
            follows = arm in ("mars", "steer") and i < 3
            response = (WARM if pole == "+" else COLD) if follows else FLAT
            recs.append(_rec(f"{pid}-c", pid, "affect", "conflict", arm, pole, response))
        if arm != "steer":
            for i in range(5):
                recs.append(_rec(f"mem-{i:04d}-a", f"mem-{i:04d}", "memory", "selection", arm, None,
                                 "Rex the beagle." if arm == "mars" else "Rex, Lisbon, piano."))
    return recs


def test_scores_and_report_carry_steer_next_to_the_other_arms(tmp_path, capsys) -> None:
    from app.cli import main
    from scorers.evaluate import score_all
    from scorers.report_md import format_evaluation
    from tasks.report_plots import capability_rates

    recs = synthetic_generations()
    hyp = {"id": "H8-steer", "capability": "all", "metric": "directional", "arm": "steer", "beats": "ablated",
           "alpha": 0.05}
    settings = {"hypotheses": [hyp], "bootstrap_resamples": 200, "alpha": 0.01, "bootstrap_seed": 0,
                "persistence_segments": 3}
    meas = {"model": "native", "steer": {"layer": 1, "layer_rule": "test", "multiplier": 0.5, "method": "diff_means",
                                         "layer_norm": 4.0, "concepts": ["affect", "time", "ethics"]}}
    scores = score_all(recs, settings, meas)
    assert scores["arms"] == ["mars", "ablated", "text", "steer"] and scores["steer"] == meas["steer"]
    reg = scores["capabilities"]["affect"]["arms"]["steer"]
    assert (reg["pairs"], reg["wins"], reg["losses"]) == (10, 7, 0)
    rows = {(r["capability"], r["kind"]): r for r in scores["channel_vs_text"]}
    affect = rows[("affect", "register")]
    # STEER vs ABLATED on per-prompt signs: steer alone wins on prompts 1..6, ablated alone on none. With no
    # losses anywhere the signs are 0/1, so the two-sided sign test equals the exact McNemar (statsmodels)
    d = affect["deltas"]["steer-ablated"]
    assert d["discordant"] == [6, 0] and d["delta"] == pytest.approx(0.6)
    assert d["p"] == pytest.approx(mcnemar([[1, 6], [0, 3]], exact=True).pvalue)
    ms = affect["deltas"]["mars-steer"]
    assert ms["discordant"] == [2, 0] and ms["p"] == pytest.approx(mcnemar([[7, 2], [0, 1]], exact=True).pvalue)
    assert rows[("memory", "selection")]["arms"]["steer"] == {"prompts": 0, "rows": 0, "rate": None, "ci95": None}
    assert rows[("affect", "conflict")]["arms"]["steer"]["rate"] == 0.75
    h = scores["hypotheses"][0]
    assert [m["capability"] for m in h["members"]] == ["affect"] and h["members"][0]["counts"] == \
        {"wins": 6, "losses": 0, "ties": 4}

    md = format_evaluation(scores)
    assert "## STEER arm (activation addition)" in md and "layer 1 (test), multiplier 0.5" in md
    assert "| affect | register | 10 | 90.0% (p " in md and "+60.0 pp [" in md and "] p 0.0312 | +20.0 pp [" in md
    assert "steer-ablated [95% CI] sign-test p" in md and "H8-steer" in md
    assert capability_rates(scores["channel_vs_text"], scores["arms"]).startswith(b"\x89PNG")

    # the offline re-score reproduces a saved scores.json with the STEER arm exactly
    gen = tmp_path / "generations.jsonl"
    gen.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in recs))
    (tmp_path / "settings.json").write_text(json.dumps(settings))
    (tmp_path / "measurements.json").write_text(json.dumps(meas))
    (tmp_path / "scores.json").write_text(json.dumps(scores, indent=1))
    assert main(["score", str(gen), "--check"]) == 0
    assert "STEER arm" in capsys.readouterr().out


def test_profile_takes_steer_hypotheses_only_on_directional_metrics() -> None:
    from tinymars.profile import HypothesisSpec, load_profile

    HypothesisSpec(id="H8", metric="directional", arm="steer", beats="ablated")
    with pytest.raises(ValueError, match="steer arm carries only"):
        HypothesisSpec(id="H9", metric="dominant", arm="steer", beats="ablated")
    smoke = load_profile("smoke")
    assert "steer" in smoke.eval.arms and any(h.arm == "steer" for h in smoke.eval.hypotheses)
