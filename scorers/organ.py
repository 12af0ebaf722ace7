"""The organ experiment's comparison: per capability, the single-channel model against the integrated one.

Unit = prompt (docs/methods.md, "Units"): both models answer the same held-out prompts; each prompt's MARS
rows reduce to the capability's metric (`dominant` share for selection, the lexicon `gap` for register:
scorers.outcomes.prompt_units), and the paired difference integrated minus single is one unit. Of the
decided prompts (difference not zero) a share s favours the integrated model; under "integration changes
nothing" s = 1/2. Verdict per capability, at `alpha`:
- helps / hurts: the two-sided sign test rejects s = 1/2, and s is above / below 1/2;
- costs nothing: equivalence (TOST) within the minimal effect m: both one-sided exact binomial tests reject
  s >= 1/2 + m and s <= 1/2 - m;
- inconclusive: neither (too few decided prompts to tell).
"""

from __future__ import annotations

from typing import Any

from scorers.outcomes import paired, prompt_units
from scorers.stats import binom_test, sign_counts, sign_test_two_sided
from tinymars.domain import MIN_EFFECT_DEFAULT, SELECTION_CAPABILITIES

ARM = "mars"


def capability_metric(capability: str) -> str:
    """The per-prompt metric compared for a capability: dominant share (selection) or lexicon gap (register)."""
    return "dominant" if capability in SELECTION_CAPABILITIES else "gap"


def tost_share(wins: int, losses: int, margin: float) -> float:
    """Equivalence p-value of a share of wins within 1/2 +- margin: the larger of the two one-sided exact
    binomial p-values (H0: share >= 1/2 + margin; H0: share <= 1/2 - margin); 1.0 with no decided unit."""
    n = wins + losses
    if n == 0:
        return 1.0
    upper = binom_test(wins, n, 0.5 + margin, alternative="less")
    lower = binom_test(wins, n, 0.5 - margin, alternative="greater")
    return max(upper, lower)


def integration_verdict(wins: int, losses: int, alpha: float, margin: float) -> tuple[str, float, float]:
    """(verdict, two-sided sign-test p, TOST p) of integrated-minus-single differences (wins: integrated better)."""
    p_diff, p_equiv = sign_test_two_sided(wins, losses), tost_share(wins, losses, margin)
    if p_diff < alpha:
        return ("helps" if wins > losses else "hurts"), p_diff, p_equiv
    if p_equiv < alpha:
        return "costs nothing", p_diff, p_equiv
    return "inconclusive", p_diff, p_equiv


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def compare_capability(integrated: list[dict[str, Any]], single: list[dict[str, Any]], capability: str,
                       alpha: float, margin: float = MIN_EFFECT_DEFAULT["share"]) -> dict[str, Any]:
    """One row of the organ table from both models' generation records (turn 0, MARS arm)."""
    metric = capability_metric(capability)
    a = prompt_units(integrated, capability, metric).get(ARM, {})
    b = prompt_units(single, capability, metric).get(ARM, {})
    prompts, diffs = paired({"integrated": a, "single": b}, "integrated", "single")
    wins, losses = sign_counts(diffs)
    verdict, p_diff, p_equiv = integration_verdict(wins, losses, alpha, margin)
    return {"capability": capability, "metric": metric, "n": len(prompts), "wins": wins, "losses": losses,
            "ties": len(prompts) - wins - losses,
            "single": _mean([b[u] for u in prompts]), "integrated": _mean([a[u] for u in prompts]),
            "share": wins / (wins + losses) if wins + losses else None,
            "p_two_sided": p_diff, "p_equivalence": p_equiv, "margin": margin, "alpha": alpha, "verdict": verdict}


def organ_table(integrated: list[dict[str, Any]], singles: dict[str, tuple[str, list[dict[str, Any]]]],
                alpha: float, margin: float = MIN_EFFECT_DEFAULT["share"]) -> list[dict[str, Any]]:
    """Rows per capability; `singles`: {capability: (single model's name, its generation records)}."""
    return [{"single_model": name, **compare_capability(integrated, records, cap, alpha, margin)}
            for cap, (name, records) in singles.items()]


def organ_markdown(rows: list[dict[str, Any]], integrated: str) -> list[str]:
    """The report's single-vs-integrated table."""
    if not rows:
        return []

    def num(x: float | None) -> str:
        return "–" if x is None else f"{x:.3f}"

    out = ["## As one organ: single-channel vs integrated", "",
           f"Per capability, the single-channel native and the integrated native `{integrated}` (MARS arm) on the "
           "same held-out prompts. Unit = prompt; metric: dominant share (selection) or lexicon gap (register); "
           "wins = prompts where the integrated model scores higher. helps / hurts: two-sided sign test; costs "
           "nothing: equivalence (TOST) of the share of wins within 1/2 +- the margin (docs/methods.md).", "",
           "| capability | single model | metric | single | integrated | prompts | wins / losses / ties | "
           "p (two-sided) | p (equivalence) | verdict |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['capability']} | {r['single_model']} | {r['metric']} | {num(r['single'])} | "
                   f"{num(r['integrated'])} | {r['n']} | {r['wins']} / {r['losses']} / {r['ties']} | "
                   f"{r['p_two_sided']:.3g} | {r['p_equivalence']:.3g} (±{r['margin']:g}) | {r['verdict']} |")
    return [*out, ""]
