"""The crosstalk matrix of one channel model: does moving channel X change capability Y's metric?

Cell (X, Y), X != Y: on Y's held-out prompts (Y's own channel at each row's state), channel X is set to one
of two of its states and then the other (a register channel's + and - pole, a selection channel's two
items: models.crosstalk); each prompt's Y metric (scorers.organ.capability_metric) under the first minus
under the second is the unit. The diagonal (Y, Y) is the intended effect, measured the same way between
MARS and ABLATED (Y's channel at its state vs zeroed). Test per cell, two-sided at `alpha`: the sign test
for a dominant share, the Wilcoxon signed-rank test for a lexicon gap (scorers.outcomes.MAGNITUDE_METRICS).
The off-diagonal cells are one Holm family: "no channel interferes with another".
"""

from __future__ import annotations

from typing import Any

from scorers.organ import capability_metric
from scorers.outcomes import MAGNITUDE_METRICS, paired, prompt_units
from scorers.stats import holm, sign_counts, sign_test_two_sided, wilcoxon_signed_rank
from tinymars.domain import crosstalk_arm as state_arm


def cell(records: list[dict[str, Any]], capability: str, arm: str, other: str) -> dict[str, Any]:
    """Paired per-prompt difference of the capability's metric, arm minus other, and its two-sided test."""
    metric = capability_metric(capability)
    prompts, diffs = paired(prompt_units(records, capability, metric), arm, other)
    wins, losses = sign_counts(diffs)
    if metric in MAGNITUDE_METRICS:
        p, test = wilcoxon_signed_rank(diffs, alternative="two-sided"), "wilcoxon"
    else:
        p, test = sign_test_two_sided(wins, losses), "sign"
    return {"n": len(prompts), "mean_diff": sum(diffs) / len(diffs) if diffs else None, "wins": wins,
            "losses": losses, "p": p, "test": test, "metric": metric}


def crosstalk_matrix(records: list[dict[str, Any]], xrecords: list[dict[str, Any]], channels: list[str],
                     alpha: float) -> dict[str, Any]:
    """{channels, alpha, cells: [{x, y, ...cell, p_holm, significant}]} for every (X, Y) of `channels`.

    `records`: the model's eval generations (the diagonal: MARS vs ABLATED); `xrecords`: the crosstalk
    generations (arms state_arm(X, 'a' | 'b'), rows of capability Y)."""
    cells = []
    for y in channels:
        for x in channels:
            if x == y:
                c = cell(records, y, "mars", "ablated")
            else:
                c = cell(xrecords, y, state_arm(x, "a"), state_arm(x, "b"))
            cells.append({"x": x, "y": y, "diagonal": x == y, **c})
    off = [c for c in cells if not c["diagonal"] and c["n"]]
    for c, adj in zip(off, holm([c["p"] for c in off]), strict=True):
        c["p_holm"] = adj
    for c in cells:
        c.setdefault("p_holm", c["p"] if c["diagonal"] else None)
        c["significant"] = c["p_holm"] is not None and c["p_holm"] < alpha
    return {"channels": list(channels), "alpha": alpha, "cells": cells}


def crosstalk_markdown(matrix: dict[str, Any] | None) -> list[str]:
    """The report's crosstalk table: rows = channel moved (X), columns = capability measured (Y)."""
    if not matrix:
        return []
    chans = matrix["channels"]
    at = {(c["x"], c["y"]): c for c in matrix["cells"]}

    def show(c: dict[str, Any]) -> str:
        if not c["n"]:
            return "–"
        star = " *" if c["significant"] else ""
        p = c["p_holm"] if c["p_holm"] is not None else c["p"]
        return f"{c['mean_diff']:+.3f} (p {p:.2g}, n {c['n']}){star}"

    out = ["## Crosstalk matrix", "",
           "Row X = the channel moved between two of its poles / items; column Y = the capability measured, on "
           "Y's held-out prompts. Cell = mean per-prompt change of Y's metric (dominant share or lexicon gap), "
           "two-sided sign / Wilcoxon test, unit = prompt; off-diagonal p values Holm-adjusted over the "
           f"off-diagonal family; * = significant at alpha {matrix['alpha']}. The diagonal is the intended "
           "effect (MARS minus ABLATED); off-diagonal cells are interference.", "",
           "| X moved \\ Y measured | " + " | ".join(chans) + " |", "|---|" + "---|" * len(chans)]
    out += [f"| {x} | " + " | ".join(show(at[(x, y)]) for y in chans) + " |" for x in chans]
    return [*out, ""]
