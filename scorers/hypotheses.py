"""Verdicts on the hypotheses pre-registered in the profile: supported / not supported / underpowered.

A hypothesis is `{id, capability, metric, arm, beats, alpha}`: "`arm` beats `beats` on `metric`".
`capability: all` is a family with one member per capability the metric applies to (and that
has generations); the family's p-values are Holm-corrected, so claiming "every capability" costs
what it should. The test follows from the metric and from what is beaten:

- dominant / directional / conflict beating an arm: exact McNemar on the paired units
  (two-sided, direction checked).
- gap / vader_gap beating an arm: one-sided Wilcoxon signed-rank on the paired differences.
- against chance: dominant, binomial vs 1/3 (one of three items); directional, the sign test
  (wins vs losses, ties dropped); conflict, binomial vs 1/2; gap / vader_gap, one-sided
  Wilcoxon signed-rank on the gaps.

Effects come with a 95% interval: a paired bootstrap of the mean difference (arm comparisons and
gaps), Clopper-Pearson for a rate against chance.

A member's verdict: `supported` when its Holm-adjusted p < alpha and the effect has the claimed
direction; `underpowered` when the effect has the claimed direction (or there are no units at all)
but fewer units were observed than an exact test needs for 80% power at the observed effect, at
the family's strictest Holm level alpha / m; otherwise `not supported`. A family is supported when
every member is, not supported when any member is not, underpowered otherwise.
"""

from __future__ import annotations

import math
from typing import Any

from scorers.outcomes import BINARY_METRICS, METRIC_KIND, applies, paired, unit_scores
from scorers.stats import (
    binom_test,
    binomial_n_for_power,
    bootstrap_mean_ci,
    clopper_pearson,
    holm,
    mcnemar_exact,
    sign_test,
    wilcoxon_n_for_power,
    wilcoxon_signed_rank,
)

CHANCE = {"dominant": 1.0 / 3.0, "conflict": 0.5, "directional": 0.5}
POWER = 0.8
VERDICTS = ("supported", "not supported", "underpowered")


def _scale(units_needed: int | None, informative: int, n: int) -> int | None:
    """Units needed in total when only a fraction of units (discordant, untied) carries information."""
    if units_needed is None or informative == 0:
        return None
    return int(math.ceil(units_needed * n / informative))


def _vs_arm(scores: dict[str, dict[str, Any]], metric: str, arm: str, other: str, level: float,
            boot: dict[str, int]) -> dict[str, Any]:
    units, a, b = paired(scores, arm, other)
    n = len(units)
    if metric in BINARY_METRICS:
        only_a = sum(x and not y for x, y in zip(a, b, strict=True))
        only_b = sum(y and not x for x, y in zip(a, b, strict=True))
        diffs = [float(x) - float(y) for x, y in zip(a, b, strict=True)]
        need = binomial_n_for_power(only_a / (only_a + only_b), 0.5, level, POWER, "two-sided") \
            if only_a + only_b else None
        return {"test": "exact McNemar", "n": n, "counts": {f"{arm}_only": only_a, f"{other}_only": only_b},
                "p": mcnemar_exact(only_a, only_b), "direction_ok": only_a > only_b,
                "effect": sum(diffs) / n if n else None, "effect_label": f"rate {arm} - {other}",
                "ci95": bootstrap_mean_ci(diffs, **boot), "n_needed": _scale(need, only_a + only_b, n)}
    diffs = [float(x) - float(y) for x, y in zip(a, b, strict=True)]
    mean = sum(diffs) / n if n else None
    return {"test": "Wilcoxon signed-rank", "n": n, "counts": {}, "p": wilcoxon_signed_rank(diffs, "greater"),
            "direction_ok": bool(mean is not None and mean > 0), "effect": mean,
            "effect_label": f"mean {metric} {arm} - {other}", "ci95": bootstrap_mean_ci(diffs, **boot),
            "n_needed": wilcoxon_n_for_power(diffs, level, POWER)}


def _vs_chance(values: list[Any], metric: str, level: float, boot: dict[str, int]) -> dict[str, Any]:
    """`values` are the arm's unit values; for `directional` they are the gaps (the sign test needs ties)."""
    n = len(values)
    if metric in ("gap", "vader_gap"):
        diffs = [float(v) for v in values]
        mean = sum(diffs) / n if n else None
        return {"test": "Wilcoxon signed-rank vs 0", "n": n, "counts": {},
                "p": wilcoxon_signed_rank(diffs, "greater"), "direction_ok": bool(mean is not None and mean > 0),
                "effect": mean, "effect_label": f"mean {metric}", "ci95": bootstrap_mean_ci(diffs, **boot),
                "n_needed": wilcoxon_n_for_power(diffs, level, POWER)}
    if metric == "directional":  # the sign test: ties carry no direction
        gaps = [float(v) for v in values]
        wins, losses = sum(g > 0 for g in gaps), sum(g < 0 for g in gaps)
        decided = wins + losses
        need = binomial_n_for_power(wins / decided, 0.5, level, POWER) if decided else None
        return {"test": "sign test", "n": len(gaps), "counts": {"wins": wins, "losses": losses},
                "p": sign_test(wins, losses), "direction_ok": wins > losses,
                "effect": wins / decided if decided else None, "effect_label": "wins / (wins + losses)",
                "ci95": list(clopper_pearson(wins, decided)) if decided else None,
                "n_needed": _scale(need, decided, len(gaps))}
    k, p0 = sum(bool(v) for v in values), CHANCE[metric]
    rate = k / n if n else None
    return {"test": f"binomial vs {p0:.3g}", "n": n, "counts": {"successes": k}, "p": binom_test(k, n, p0),
            "direction_ok": bool(rate is not None and rate > p0), "effect": rate, "effect_label": "rate",
            "ci95": list(clopper_pearson(k, n)) if n else None,
            "n_needed": binomial_n_for_power(rate, p0, level, POWER) if n else None}


def _member_verdict(m: dict[str, Any], alpha: float) -> str:
    if m["n"] > 0 and m["p_holm"] < alpha and m["direction_ok"]:
        return "supported"
    if m["n"] == 0 or (m["direction_ok"] and m["n_needed"] is not None and m["n"] < m["n_needed"]):
        return "underpowered"
    return "not supported"


def _family_verdict(verdicts: list[str]) -> str:
    if verdicts and all(v == "supported" for v in verdicts):
        return "supported"
    if "not supported" in verdicts:
        return "not supported"
    return "underpowered"


def family_members(hypothesis: dict[str, Any], available: list[tuple[str, str]]) -> list[str]:
    """The capabilities a hypothesis covers; for `all`, those with generations of the metric's kind.

    `available` lists (capability, kind) pairs that have generations, in report order.
    """
    cap, metric = hypothesis["capability"], hypothesis["metric"]
    if cap == "all":
        return [c for c, kind in available if kind == METRIC_KIND[metric] and applies(metric, c)]
    if not applies(metric, cap):
        raise ValueError(f"hypothesis {hypothesis['id']}: metric {metric!r} does not apply to {cap!r}")
    return [cap]


def evaluate_hypothesis(records: list[dict[str, Any]], hypothesis: dict[str, Any],
                        available: list[tuple[str, str]], boot: dict[str, int]) -> dict[str, Any]:
    """One pre-registered hypothesis: its members' tests, Holm-adjusted, and the verdicts."""
    h = {k: hypothesis[k] for k in ("id", "capability", "metric", "arm", "beats", "alpha")}
    if h["metric"] not in METRIC_KIND:
        raise ValueError(f"hypothesis {h['id']}: unknown metric {h['metric']!r}; known: {', '.join(METRIC_KIND)}")
    caps = family_members(h, available)
    level = h["alpha"] / max(1, len(caps))
    members = []
    for cap in caps:
        if h["beats"] == "chance":
            metric = "gap" if h["metric"] == "directional" else h["metric"]
            values = list(unit_scores(records, cap, metric).get(h["arm"], {}).values())
            test = _vs_chance(values, h["metric"], level, boot)
        else:
            test = _vs_arm(unit_scores(records, cap, h["metric"]), h["metric"], h["arm"], h["beats"], level, boot)
        members.append({"capability": cap, **test})
    for m, adj in zip(members, holm([m["p"] for m in members]), strict=True):
        m["p_holm"] = adj
        m["verdict"] = _member_verdict(m, h["alpha"])
    return {**h, "family_size": len(members), "members": members,
            "verdict": _family_verdict([m["verdict"] for m in members])}


def evaluate_hypotheses(records: list[dict[str, Any]], hypotheses: list[dict[str, Any]],
                        available: list[tuple[str, str]], seed: int, resamples: int) -> list[dict[str, Any]]:
    """Every pre-registered hypothesis in profile order; ids must be unique."""
    ids = [h["id"] for h in hypotheses]
    if len(set(ids)) != len(ids):
        raise ValueError(f"hypothesis ids must be unique, got {ids}")
    boot = {"seed": seed, "resamples": resamples}
    return [evaluate_hypothesis(records, h, available, boot) for h in hypotheses]
