"""Verdicts on the hypotheses pre-registered in the profile: supported / not supported / inconclusive.

A hypothesis is `{id, capability, metric, arm, beats, alpha, min_effect}`: "`arm` beats `beats` (an arm,
or chance) on `metric`", with the smallest effect worth finding fixed before the run. `capability: all`
is a family with one member per capability the metric applies to (and that has generations); the
family's p-values are Holm-corrected. The unit is always the prompt (`scorers.outcomes`), and the test
follows from the metric and from what is beaten (docs/methods.md has the table and the reasons):

| metric | against chance | against an arm |
|---|---|---|
| dominant, conflict | one-sided t-test of per-prompt rates vs chance (1/3, 1/2) | sign test on per-prompt differences |
| conflict_pair | (none: no valid chance level) | sign test on per-prompt differences |
| directional | sign test on per-prompt signs (+1/0/-1) | sign test on per-prompt sign differences |
| gap, vader_gap | Wilcoxon signed-rank on per-prompt gaps | Wilcoxon signed-rank on per-prompt differences |

Every test is one-sided in the claimed direction. Each member reports its effect on the test's own
scale with a 95% interval (Clopper-Pearson for shares and binomial rates, the t interval for per-prompt
rates, a seeded bootstrap over prompts for d_z), and the number of units the test needs for 80% power
at the pre-registered minimal effect, at the family's strictest Holm level alpha / m — computed from the
design, never from the observed effect.

A member's verdict: `supported` when its Holm-adjusted p < alpha; otherwise `not supported` when the
interval's upper bound lies below the minimal effect or the test had at least the units it needed for
80% power; otherwise `inconclusive`. A family is supported when every member is, not supported when
any member is not, inconclusive otherwise.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from scorers.outcomes import MAGNITUDE_METRICS, METRIC_KIND, applies, paired, prompt_units
from scorers.stats import (
    binomial_n_for_power,
    bootstrap_ci,
    clopper_pearson,
    holm,
    rate_interval,
    rowwise_dz,
    sign_counts,
    sign_test,
    signed_rank_n_for_power,
    standardized_mean,
    t_n_for_power,
    t_test_greater,
    wilcoxon_signed_rank,
)
from tinymars.domain import CHANCE, CHANCE_UNDEFINED, MIN_EFFECT_DEFAULT, effect_scale

POWER = 0.8
VERDICTS = ("supported", "not supported", "inconclusive")


def minimal_effect(hypothesis: dict[str, Any]) -> float:
    """The pre-registered minimal effect, or the documented default of its scale (tinymars.domain)."""
    return hypothesis.get("min_effect") or MIN_EFFECT_DEFAULT[effect_scale(hypothesis["metric"], hypothesis["beats"])]


def design_n(metric: str, beats: str, level: float, min_effect: float) -> int | None:
    """Units the hypothesis's test needs for 80% power at `min_effect`, at test level `level`: fixed by the
    design (test, alpha / family size, minimal effect) before any data. Units: decided prompts for sign
    tests, prompts otherwise."""
    scale = effect_scale(metric, beats)
    if scale == "share":
        return binomial_n_for_power(0.5 + min_effect, 0.5, level, POWER)
    if scale == "dz":
        return signed_rank_n_for_power(min_effect, level, POWER)
    p0 = CHANCE[metric]
    nearest_half = min(max(0.5, p0), p0 + min_effect)  # a per-prompt rate's spread is largest at 1/2
    return t_n_for_power(min_effect, float(np.sqrt(nearest_half * (1 - nearest_half))), level, POWER)


def _sign_member(diffs: list[float], null_label: str) -> dict[str, Any]:
    """Sign test on paired units: of the decided units (difference not 0), the share favouring the claim."""
    wins, losses = sign_counts(diffs)
    decided = wins + losses
    return {"test": "sign test", "unit": "decided prompt", "n": len(diffs), "n_informative": decided,
            "counts": {"wins": wins, "losses": losses, "ties": len(diffs) - decided},
            "p": sign_test(wins, losses), "null": 0.5, "effect": wins / decided if decided else None,
            "effect_label": f"share of decided prompts favouring the claim ({null_label})",
            "ci95": list(clopper_pearson(wins, decided)) if decided else None}


def _signed_rank_member(values: list[float], label: str, boot: dict[str, int]) -> dict[str, Any]:
    """Wilcoxon signed-rank on per-prompt values (gaps, or gap differences); effect d_z."""
    nonzero = sum(v != 0 for v in values)
    return {"test": "Wilcoxon signed-rank", "unit": "prompt", "n": len(values), "n_informative": len(values),
            "counts": {"positive": sum(v > 0 for v in values), "negative": sum(v < 0 for v in values),
                       "zero": len(values) - nonzero},
            "p": wilcoxon_signed_rank(values, "greater"), "null": 0.0, "effect": standardized_mean(values),
            "effect_label": f"d_z of {label}", "mean": float(np.mean(values)) if values else None,
            "ci95": bootstrap_ci(values, rowwise_dz, **boot)}


def _rate_member(values: list[float], metric: str) -> dict[str, Any]:
    """A rate against chance: dominant and conflict average several rows per prompt, so the test is the
    one-sided t-test on the per-prompt rates (cluster-aware)."""
    p0, n = CHANCE[metric], len(values)
    return {"test": f"one-sided t-test of per-prompt rates vs {p0:.3g}", "unit": "prompt", "n": n,
            "n_informative": n, "counts": {}, "p": t_test_greater(values, p0), "null": p0,
            "effect": float(np.mean(values)) if n else None, "effect_label": f"mean per-prompt {metric} rate",
            "ci95": rate_interval(values)}


def member_test(records: list[dict[str, Any]], hypothesis: dict[str, Any], capability: str, level: float,
                boot: dict[str, int]) -> dict[str, Any]:
    """One capability's test of a hypothesis, at the family's strictest Holm level `level` (for power)."""
    metric, arm, beats = hypothesis["metric"], hypothesis["arm"], hypothesis["beats"]
    scale = effect_scale(metric, beats)
    min_effect = minimal_effect(hypothesis)
    units = prompt_units(records, capability, metric)
    if beats == "chance" and metric in CHANCE_UNDEFINED:
        raise ValueError(f"hypothesis {hypothesis['id']}: {metric} has no valid chance level; compare it with an arm")
    if beats == "chance":
        values = list(units.get(arm, {}).values())
        if metric in MAGNITUDE_METRICS:
            test = _signed_rank_member(values, f"{arm} {metric}", boot)
        elif metric == "directional":
            test = _sign_member(values, f"{arm}: + response reads more like +")
        else:
            test = _rate_member(values, metric)
    else:
        _, diffs = paired(units, arm, beats)
        if metric in MAGNITUDE_METRICS:
            test = _signed_rank_member(diffs, f"{metric} {arm} - {beats}", boot)
        else:
            test = _sign_member(diffs, f"{arm} over {beats}")
    return {"capability": capability, **test, "scale": scale, "min_effect": min_effect,
            "threshold": test["null"] + min_effect, "n_needed": design_n(metric, beats, level, min_effect)}


def member_verdict(m: dict[str, Any], alpha: float) -> tuple[str, str]:
    """(verdict, reason) of one member from its Holm-adjusted p, its interval and its a-priori n."""
    if m["n"] > 0 and m["p_holm"] < alpha:
        return "supported", f"Holm p < {alpha:g}"
    if m["ci95"] is not None and m["ci95"][1] < m["threshold"]:
        return "not supported", "95% interval excludes the minimal effect"
    if m["n_needed"] is not None and m["n_informative"] >= m["n_needed"]:
        return "not supported", "powered for the minimal effect, not significant"
    return "inconclusive", "not significant, too few units to rule out the minimal effect"


def family_verdict(verdicts: list[str]) -> str:
    """Every member supported: supported; any member not supported: not supported; else inconclusive."""
    if verdicts and all(v == "supported" for v in verdicts):
        return "supported"
    if "not supported" in verdicts:
        return "not supported"
    return "inconclusive"


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
    h["min_effect"] = hypothesis.get("min_effect")
    if h["metric"] not in METRIC_KIND:
        raise ValueError(f"hypothesis {h['id']}: unknown metric {h['metric']!r}; known: {', '.join(METRIC_KIND)}")
    caps = family_members(h, available)
    level = h["alpha"] / max(1, len(caps))
    members = [member_test(records, h, cap, level, boot) for cap in caps]
    for m, adj in zip(members, holm([m["p"] for m in members]), strict=True):
        m["p_holm"] = adj
        m["verdict"], m["reason"] = member_verdict(m, h["alpha"])
    return {**h, "family_size": len(members), "members": members,
            "verdict": family_verdict([m["verdict"] for m in members])}


def evaluate_hypotheses(records: list[dict[str, Any]], hypotheses: list[dict[str, Any]],
                        available: list[tuple[str, str]], seed: int, resamples: int) -> list[dict[str, Any]]:
    """Every pre-registered hypothesis in profile order; ids must be unique. Turn-0 records only count."""
    ids = [h["id"] for h in hypotheses]
    if len(set(ids)) != len(ids):
        raise ValueError(f"hypothesis ids must be unique, got {ids}")
    boot = {"seed": seed, "resamples": resamples}
    return [evaluate_hypothesis(records, h, available, boot) for h in hypotheses]


def power_plan(hypotheses: list[dict[str, Any]], planned: dict[tuple[str, str], int]) -> list[dict[str, Any]]:
    """Before the run: per hypothesis member, the units its test needs for 80% power at the minimal effect
    against the prompts the profile will evaluate. `planned` maps (capability, kind) to held-out prompts.

    A sign test counts decided prompts (ties drop out), so planned prompts are an upper bound for it.
    """
    out = []
    available = [key for key in planned if planned[key] > 0]
    for h in hypotheses:
        caps = family_members(h, available)
        level = h["alpha"] / max(1, len(caps))
        scale = effect_scale(h["metric"], h["beats"])
        min_effect = minimal_effect(h)
        for cap in caps:
            units = planned[(cap, METRIC_KIND[h["metric"]])]
            needed = design_n(h["metric"], h["beats"], level, min_effect)
            out.append({"id": h["id"], "capability": cap, "scale": scale, "min_effect": min_effect,
                        "level": level, "n_needed": needed, "unit": "decided prompt" if scale == "share" else "prompt",
                        "planned_prompts": units, "reachable": needed is not None and units >= needed})
    return out
