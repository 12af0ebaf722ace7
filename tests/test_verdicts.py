"""Verdicts a skeptic can trust: the cases that used to report a null result as a discovery, the prompt as
the unit, a-priori power, and the references each statistic is checked against (scipy, statsmodels,
simulation). docs/methods.md describes every test exercised here."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import binomtest, ttest_1samp, wilcoxon

from scorers.evaluate import score_all
from scorers.stats import (
    binomial_n_for_power,
    signed_rank_n_for_power,
    t_interval,
    t_n_for_power,
    t_power,
)

WARM, COLD, FLAT = "Happy to help, lovely!", "Sigh, how tedious.", "Here is the plan."


def _rec(pid: str, arm: str, kind: str, pole: str, response: str, cap: str = "affect", turn: int = 0,
         row: str | None = None) -> dict:
    return {"row_id": row or f"{pid}-{pole}", "prompt_id": pid, "capability": cap, "kind": kind, "arm": arm,
            "turn": turn, "pole": pole, "text_pole": ("-" if pole == "+" else "+") if kind == "conflict" else None,
            "salient_item": None, "items": [], "response": response, "prompt_tokens": 10, "response_tokens": 5}


def _register(outcomes: dict[str, list[str]], cap: str = "affect") -> list[dict]:
    """Register prompts per arm: 'win' (+ warm, - cold), 'loss' (the other way), 'tie' (both flat)."""
    pairs = {"win": (WARM, COLD), "loss": (COLD, WARM), "tie": (FLAT, FLAT)}
    recs = []
    for arm, seq in outcomes.items():
        for i, outcome in enumerate(seq):
            plus, minus = pairs[outcome]
            recs += [_rec(f"p{i:03d}", arm, "register", pole, text, cap) for pole, text in (("+", plus), ("-", minus))]
    return recs


def _conflict(follow: list[tuple[bool, bool]], arm: str = "mars") -> list[dict]:
    """Two conflict rows per prompt (channel + against text -, channel - against text +)."""
    recs = []
    for i, (first, second) in enumerate(follow):
        recs.append(_rec(f"c{i:03d}", arm, "conflict", "+", WARM if first else COLD))
        recs.append(_rec(f"c{i:03d}", arm, "conflict", "-", COLD if second else WARM))
    return recs


def _hyp(metric: str, beats: str, arm: str = "mars", alpha: float = 0.01, **extra) -> dict:
    return {"id": "H", "capability": "affect", "metric": metric, "arm": arm, "beats": beats, "alpha": alpha, **extra}


def _member(records: list[dict], hyp: dict) -> dict:
    scores = score_all(records, {"hypotheses": [hyp], "bootstrap_resamples": 500})
    return scores["hypotheses"][0]["members"][0]


# ---------------------------------------------------------------- the two cases of the issue
COIN_FLIP = {"mars": ["win"] * 12 + ["loss"] * 11 + ["tie"], "ablated": ["tie"] * 24}


def test_coin_flip_against_a_tie_degenerate_arm_is_not_a_discovery() -> None:
    # Greedy decoding with channels zeroed gives identical + and - responses: ABLATED's gap is 0 everywhere.
    # Booleans (gap > 0) turned MARS's 12 wins into 12 "MARS only" cells and McNemar said p = 0.0005.
    m = _member(_register(COIN_FLIP), _hyp("directional", "ablated"))
    assert m["test"] == "sign test" and m["counts"] == {"wins": 12, "losses": 11, "ties": 1}
    assert m["p"] == pytest.approx(binomtest(12, 23, 0.5, alternative="greater").pvalue) == pytest.approx(0.5)
    assert m["verdict"] == "inconclusive"  # 23 decided prompts can neither show nor rule out a 65% share
    assert m["n_needed"] == binomial_n_for_power(0.65, 0.5, 0.01) > m["n_informative"]
    # the table of arms measures the net direction, not the share of wins: +1/24, not +50 pp
    rows = {r["kind"]: r for r in score_all(_register(COIN_FLIP), {"bootstrap_resamples": 200})["channel_vs_text"]}
    delta = rows["register"]["deltas"]["mars-ablated"]
    assert delta["delta"] == pytest.approx(1 / 24) and delta["discordant"] == [12, 11]
    assert delta["p"] == pytest.approx(binomtest(12, 23, 0.5).pvalue)


def test_coin_flip_signed_gap_against_a_tie_degenerate_arm() -> None:
    m = _member(_register(COIN_FLIP), _hyp("gap", "ablated"))
    diffs = [4.0] * 12 + [-4.0] * 11 + [0.0]
    assert m["p"] == pytest.approx(wilcoxon(diffs, zero_method="wilcox", alternative="greater").pvalue)
    assert m["p"] > 0.3 and m["verdict"] != "supported"


def test_conflict_31_of_60_is_judged_on_prompts_with_a_priori_power() -> None:
    # 31 of 60 rows follow the channel (chance 1/2). The old layer said "underpowered, n needed 9,063" at the
    # observed effect. Now: the prompt is the unit (two rows each), the n needed is fixed by the design.
    spread = [(True, True)] + [(True, False)] * 29  # every prompt near 1/2: a tight interval
    clustered = [(True, True)] * 15 + [(True, False)] + [(False, False)] * 14  # prompts all-or-nothing
    for follow in (spread, clustered):
        assert sum(a + b for a, b in follow) == 31 and len(follow) == 30
    tight = _member(_conflict(spread), _hyp("conflict", "chance"))
    wide = _member(_conflict(clustered), _hyp("conflict", "chance"))
    for m, follow in ((tight, spread), (wide, clustered)):
        rates = [(a + b) / 2 for a, b in follow]
        assert m["n"] == 30 and m["effect"] == pytest.approx(31 / 60)
        assert m["p"] == pytest.approx(ttest_1samp(rates, 0.5, alternative="greater").pvalue)
        assert m["n_needed"] == t_n_for_power(0.15, 0.5, 0.01, 0.8)  # same design, same n: the data play no part
    assert tight["verdict"] == "not supported" and tight["ci95"][1] < 0.65
    assert tight["reason"] == "95% interval excludes the minimal effect"
    # the same 31/60 from all-or-nothing prompts is 30 units' worth of evidence: it cannot rule out 65%
    assert wide["verdict"] == "inconclusive" and wide["ci95"][1] > 0.65


def test_a_powered_null_is_not_supported() -> None:
    # 130 coin-flip prompts: more decided prompts than the test needs for the minimal effect at alpha 0.05
    outcomes = {"mars": ["win", "loss"] * 65, "ablated": ["tie"] * 130}
    m = _member(_register(outcomes), _hyp("directional", "ablated", alpha=0.05))
    assert m["n_needed"] == binomial_n_for_power(0.65, 0.5, 0.05) <= m["n_informative"] == 130
    assert m["verdict"] == "not supported"
    # a larger pre-registered minimal effect needs fewer units; a smaller one more (never the observed effect)
    assert _member(_register(outcomes), _hyp("directional", "ablated", min_effect=0.3))["n_needed"] < m["n_needed"]
    assert _member(_register(outcomes), _hyp("directional", "ablated", min_effect=0.05))["n_needed"] > m["n_needed"]


def test_a_strong_effect_is_supported() -> None:
    outcomes = {"mars": ["win"] * 22 + ["loss"] * 2, "ablated": ["tie"] * 24}
    m = _member(_register(outcomes), _hyp("directional", "ablated"))
    assert m["verdict"] == "supported" and m["p"] == pytest.approx(binomtest(22, 24, 0.5, "greater").pvalue)


# ---------------------------------------------------------------- pair-level conflict, persistence
def test_conflict_pair_level_is_tested_against_ablated_never_against_a_quarter() -> None:
    follow = [(True, True)] * 14 + [(True, False)] * 4 + [(False, False)] * 2
    recs = _conflict(follow) + _conflict([(True, False)] * 20, arm="ablated")
    vs = _member(recs, _hyp("conflict_pair", "ablated"))
    assert vs["test"] == "sign test" and vs["counts"] == {"wins": 14, "losses": 0, "ties": 6}
    assert vs["p"] == pytest.approx(0.5**14) and vs["verdict"] == "supported"
    block = score_all(recs)["capabilities"]["affect"]["conflict"]["arms"]["mars"]
    assert (block["pairs"], block["channel_decides"], block["pair_rate"]) == (20, 14, 0.7)
    assert block["pair_p"] == pytest.approx(0.5**14)  # the descriptive table uses the same valid test
    # a model that ignores the channel but defies the text with a prompt-varying probability g makes both rows
    # "follow the channel" with probability E[g^2] >= 1/4: a test against 1/4 would call it a discovery
    g = np.random.default_rng(1).beta(0.5, 0.5, size=200_000)
    assert np.mean(g**2) > 0.3
    with pytest.raises(ValueError, match="no valid chance level"):
        _member(recs, _hyp("conflict_pair", "chance"))
    from tinymars.profile import HypothesisSpec

    with pytest.raises(ValueError, match="conflict_pair has no valid chance level"):
        HypothesisSpec(id="H", metric="conflict_pair", beats="chance")


def test_persistence_carry_over_is_the_channel_not_the_conversation() -> None:
    turn0 = _register({"mars": ["win"] * 10, "ablated": ["tie"] * 10})
    turn1 = [{**r, "turn": 1} for r in _register({"mars": ["win"] * 9 + ["tie"], "mars_cut": ["tie"] * 8 + ["win"] * 2,
                                                   "ablated": ["tie"] * 10})]
    p = score_all(turn0 + turn1, {"bootstrap_resamples": 200})["persistence"]
    (carry,) = p["carry"]
    # prompts 0-7: MARS +1, MARS_CUT 0; prompt 8: both +1; prompt 9: MARS 0, MARS_CUT +1
    assert (carry["turn"], carry["n"], carry["wins"], carry["losses"]) == (1, 10, 8, 1)
    assert carry["mars"] == pytest.approx(0.9) and carry["mars_cut"] == pytest.approx(0.2)
    assert carry["delta"] == pytest.approx(0.7) and carry["p"] == pytest.approx(10 / 512)
    assert {r["arm"] for r in p["by_turn"]} == {"mars", "ablated", "mars_cut"}
    # mars_cut has no turn-0 records: it never enters the turn-0 tables
    assert "mars_cut" not in score_all(turn0 + turn1)["arms"]


# ---------------------------------------------------------------- references
def test_per_prompt_t_interval_equals_statsmodels_cluster_robust_errors() -> None:
    import statsmodels.api as sm

    rng = np.random.default_rng(4)
    prompts, rows = 25, 3
    propensity = rng.uniform(0.1, 0.9, prompts)  # prompt-level random effect: rows of a prompt correlate
    y = (rng.uniform(size=(prompts, rows)) < propensity[:, None]).astype(float)
    groups = np.repeat(np.arange(prompts), rows)
    fit = sm.OLS(y.ravel(), np.ones(prompts * rows)).fit(cov_type="cluster", cov_kwds={"groups": groups})
    lo, hi = t_interval(y.mean(axis=1))
    half = (hi - lo) / 2
    from scipy.stats import t

    assert (lo + hi) / 2 == pytest.approx(fit.params[0])
    assert half / t.ppf(0.975, prompts - 1) == pytest.approx(fit.bse[0], rel=1e-9)
    # the naive row-level standard error is too small on clustered rows
    assert y.std(ddof=1) / math.sqrt(prompts * rows) < 0.8 * fit.bse[0]


def test_a_priori_sample_sizes_match_statsmodels_and_simulation() -> None:
    from statsmodels.stats.power import TTestPower

    for delta, sd, alpha in ((0.15, 0.5, 0.01), (0.15, 0.4997, 0.05 / 3), (0.3, 1.0, 0.05)):
        n = t_n_for_power(delta, sd, alpha)
        exact = TTestPower().solve_power(effect_size=delta / sd, alpha=alpha, power=0.8, alternative="larger")
        assert n == math.ceil(exact)
        assert t_power(n, delta, sd, alpha) == pytest.approx(
            TTestPower().power(effect_size=delta / sd, nobs=n, alpha=alpha, alternative="larger"), abs=1e-9)
    # the signed-rank n (t-test n / ARE 3/pi) reaches ~80% power on normal differences at that d_z
    n = signed_rank_n_for_power(0.5, 0.05)
    rng = np.random.default_rng(0)
    draws = rng.normal(0.5, 1.0, size=(1500, n))
    power = np.mean(wilcoxon(draws, axis=1, alternative="greater").pvalue < 0.05)
    assert 0.76 <= power <= 0.9, (n, power)


def test_profile_validates_the_minimal_effect() -> None:
    from tinymars.profile import HypothesisSpec

    h = HypothesisSpec(id="H", metric="conflict", beats="chance", min_effect=0.2)
    assert h.model_dump()["min_effect"] == 0.2
    with pytest.raises(ValueError, match="min_effect 0.6 is impossible on the rate scale of conflict vs chance"):
        HypothesisSpec(id="H", metric="conflict", beats="chance", min_effect=0.6)
    with pytest.raises(ValueError, match="share scale"):
        HypothesisSpec(id="H", metric="dominant", beats="ablated", min_effect=0.5)
    assert HypothesisSpec(id="H", metric="gap", beats="ablated", min_effect=1.2).min_effect == 1.2


def test_power_plan_is_fixed_before_the_run() -> None:
    from app.power import planned_prompts, power_lines
    from scorers.hypotheses import design_n, power_plan
    from tinymars.profile import load_profile

    smoke, iter7 = load_profile("smoke"), load_profile("iter7")
    planned = planned_prompts(smoke)
    assert planned[("memory", "selection")] == 30 and planned[("affect", "conflict")] == 20
    plan = power_plan([h.model_dump(mode="json") for h in iter7.eval.hypotheses], planned_prompts(iter7))
    h1 = [r for r in plan if r["id"] == "H1-selection"]
    assert [r["capability"] for r in h1] == ["memory", "identity", "continuity"]
    needed = binomial_n_for_power(0.65, 0.5, 0.01 / 3)
    assert all(r["n_needed"] == design_n("dominant", "ablated", 0.01 / 3, 0.15) == needed for r in h1)
    assert all(r["reachable"] for r in plan)  # the production profile is sized to answer its questions
    lines = power_lines(smoke)
    assert lines[0].startswith("power plan") and "SHORT" in lines[1] and "cannot reach 80% power" in lines[-1]
