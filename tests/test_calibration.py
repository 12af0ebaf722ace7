"""Null calibration of the verdict layer in small (bench/calibration.py runs every hypothesis at full size).

Simulated iterations (`scorers.simulate`) on the template teacher's held-out rows go through the real
scorers and `evaluate_hypotheses`. Under a null the layer's false-positive rate must be consistent with
alpha (the Clopper-Pearson lower bound of the observed rate at most alpha), while a row-level binomial
test on the same clustered conflict rows, computed here with scipy, is shown to exceed it: the test can
tell a cluster-blind layer from one that counts prompts. A planted effect must be found.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
from scipy.stats import binomtest

from corpus.template_teacher import generate_corpus
from scorers.hypotheses import evaluate_hypotheses
from scorers.register import register_score
from scorers.selection import dominant
from scorers.simulate import ArmModel, PromptModel, register_text, selection_text, simulate_records

ALPHA = 0.05  # one member, no Holm: enough false positives in a few hundred iterations to see a bias
# a strongly clustered conflict null: per prompt, a U-shaped propensity to answer against the prompt's text,
# which both rows of the prompt share (mean 1/2, so a row follows the channel at exactly chance)
CLUSTERED = PromptModel(against_text=(0.5, 0.5))


@pytest.fixture(scope="module")
def heldout() -> list[dict[str, Any]]:
    """30 held-out prompts per capability and kind, as the smoke profile's corpus makes them."""
    rows, _ = generate_corpus(["memory", "affect"], 120, 30, 0.25, 7)
    return [r for r in rows if r["split"] == "heldout"]


def _rows(heldout: list[dict[str, Any]], capability: str, kind: str) -> list[dict[str, Any]]:
    return [r for r in heldout if r["capability"] == capability and r["kind"] == kind]


def _hypothesis(metric: str, capability: str, arm: str, beats: str) -> dict[str, Any]:
    return {"id": f"{metric}-{beats}", "capability": capability, "metric": metric, "arm": arm, "beats": beats,
            "alpha": ALPHA, "min_effect": None}


def _member(records: list[dict[str, Any]], h: dict[str, Any], kind: str) -> dict[str, Any]:
    result = evaluate_hypotheses(records, [h], [(h["capability"], kind)], seed=0, resamples=100)[0]
    assert result["family_size"] == 1
    return result["members"][0]


def _consistent_with_alpha(false_positives: int, iterations: int) -> bool:
    """The observed rate could come from a true rate <= alpha: its exact 95% interval reaches alpha."""
    return binomtest(false_positives, iterations).proportion_ci(0.95, method="exact").low <= ALPHA


def test_simulated_responses_score_as_drawn(heldout: list[dict[str, Any]]) -> None:
    rng = random.Random(0)
    for row in _rows(heldout, "memory", "selection"):
        for named in (None, 0, 1, 2):
            text = selection_text(row["items"], named, rng)
            assert [dominant(text, row["items"], i) for i in range(3)] == [named == i for i in range(3)], text
    for tone, sign in ((None, 0), ("+", 1), ("-", -1)):
        for _ in range(50):
            score = register_score(register_text("affect", tone, rng), "affect")
            assert (score > 0) - (score < 0) == sign and abs(score) <= 2


def test_a_tied_arm_answers_identical_inputs_once_and_runs_are_reproducible(heldout: list[dict[str, Any]]) -> None:
    rows = _rows(heldout, "memory", "selection") + _rows(heldout, "affect", "register")
    arms = {"mars": ArmModel(), "ablated": ArmModel(tied=True)}
    records = simulate_records(rows, arms, random.Random(3))
    assert records == simulate_records(rows, arms, random.Random(3))
    assert len(records) == 2 * len(rows)
    responses: dict[tuple[str, str], set[str]] = {}
    for r in records:
        responses.setdefault((r["arm"], r["prompt_id"]), set()).add(r["response"])
    assert all(len(texts) == 1 for (arm, _), texts in responses.items() if arm == "ablated")
    assert any(len(texts) > 1 for (arm, _), texts in responses.items() if arm == "mars")


def test_bad_simulation_inputs_are_refused_naming_the_fix(heldout: list[dict[str, Any]]) -> None:
    with pytest.raises(ValueError, match="follow is a probability"):
        ArmModel(follow={"memory": 1.5})
    with pytest.raises(ValueError, match="tied arm .* cannot carry a planted effect"):
        ArmModel(tied=True, follow={"memory": 0.5})
    with pytest.raises(ValueError, match="against_text needs two positive Beta parameters"):
        PromptModel(against_text=(0.0, 1.0))
    with pytest.raises(ValueError, match="needs held-out corpus rows"):
        simulate_records([], {"mars": ArmModel()}, random.Random(0))
    with pytest.raises(ValueError, match="at least one arm"):
        simulate_records(_rows(heldout, "affect", "conflict"), {}, random.Random(0))


def test_clustered_conflict_null_holds_alpha_on_prompts_where_a_row_level_test_does_not(
        heldout: list[dict[str, Any]]) -> None:
    rows = _rows(heldout, "affect", "conflict")
    h = _hypothesis("conflict", "affect", "mars", "chance")
    iterations, layer, naive = 400, 0, 0
    for i in range(iterations):
        records = simulate_records(rows, {"mars": ArmModel()}, random.Random(f"conflict-null/{i}"), CLUSTERED)
        layer += _member(records, h, "conflict")["verdict"] == "supported"
        follows = sum(register_score(r["response"], "affect") * (1 if r["pole"] == "+" else -1) > 0 for r in records)
        naive += binomtest(follows, len(records), 0.5, alternative="greater").pvalue < ALPHA
    assert _consistent_with_alpha(layer, iterations), f"layer: {layer}/{iterations} false positives"
    assert not _consistent_with_alpha(naive, iterations), f"row-level: only {naive}/{iterations} false positives"


def test_selection_null_against_a_tie_degenerate_ablated_holds_alpha(heldout: list[dict[str, Any]]) -> None:
    rows = _rows(heldout, "memory", "selection")
    h = _hypothesis("dominant", "memory", "mars", "ablated")
    arms = {"mars": ArmModel(), "ablated": ArmModel(tied=True)}
    iterations = 200
    hits = sum(_member(simulate_records(rows, arms, random.Random(f"selection-null/{i}")), h, "selection")["verdict"]
               == "supported" for i in range(iterations))
    assert _consistent_with_alpha(hits, iterations), f"{hits}/{iterations} false positives"


def test_a_planted_effect_is_found_and_measured_as_planted(heldout: list[dict[str, Any]]) -> None:
    follow, iterations = 0.5, 40
    rows = _rows(heldout, "affect", "conflict")
    h = _hypothesis("conflict", "affect", "mars", "chance")
    members = [_member(simulate_records(rows, {"mars": ArmModel(follow={"affect": follow})},
                                        random.Random(f"conflict-planted/{i}"), CLUSTERED), h, "conflict")
               for i in range(iterations)]
    found = sum(m["verdict"] == "supported" for m in members)
    assert binomtest(found, iterations).proportion_ci(0.95, method="exact").low > 0.5, f"found {found}/{iterations}"
    # the simulator's truth: a row follows with probability follow + (1 - follow) * E[against_text] = 0.75
    mean = sum(m["effect"] for m in members) / iterations
    assert abs(mean - (follow + (1 - follow) * 0.5)) < 0.03, mean
    rows = _rows(heldout, "memory", "selection")
    h = _hypothesis("dominant", "memory", "mars", "ablated")
    arms = {"mars": ArmModel(follow={"memory": 0.6}), "ablated": ArmModel(tied=True)}
    found = sum(_member(simulate_records(rows, arms, random.Random(f"selection-planted/{i}")), h, "selection")
                ["verdict"] == "supported" for i in range(20))
    assert found >= 15, f"a strong selection effect found in only {found}/20 iterations"
