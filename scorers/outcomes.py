"""Per-unit outcomes of one metric, per arm: the paired data every comparison between arms is built on.

A unit is what a test counts once:
- `dominant` (selection rows): the row; value True when the salient item is dominant.
- `directional` / `gap` (register rows): the prompt (its + and - responses in that arm); the value is
  the lexicon gap (+ score minus - score); directional means gap > 0.
- `vader_gap` (affect register rows): the prompt; VADER compound of + minus that of -.
- `conflict` (conflict rows): the row; value True when the response follows the channel's pole.

Only turn-0 records are read here (follow-up turns are for the persistence scorer).
"""

from __future__ import annotations

from typing import Any

from scorers.register import follows_pole, register_gap, vader_compound
from scorers.selection import dominant
from tinymars.domain import METRIC_CAPABILITIES

METRIC_KIND = {"dominant": "selection", "directional": "register", "gap": "register", "vader_gap": "register",
               "conflict": "conflict"}
BINARY_METRICS = ("dominant", "directional", "conflict")


def applies(metric: str, capability: str) -> bool:
    """Whether `metric` is defined for `capability` (tinymars.domain.METRIC_CAPABILITIES; VADER: affect only)."""
    if metric not in METRIC_KIND:
        raise ValueError(f"unknown metric {metric!r}; known: {', '.join(METRIC_KIND)}")
    return capability in METRIC_CAPABILITIES[metric]


def turn_of(record: dict[str, Any]) -> int:
    """Records written before follow-up turns existed carry no `turn`: they are turn 0."""
    return int(record.get("turn") or 0)


def unit_scores(records: list[dict[str, Any]], capability: str, metric: str) -> dict[str, dict[str, Any]]:
    """{arm: {unit id: value}} for one capability and metric, over turn-0 records."""
    kind = METRIC_KIND[metric]
    recs = [r for r in records if r["capability"] == capability and r["kind"] == kind and turn_of(r) == 0]
    out: dict[str, dict[str, Any]] = {}
    if kind == "selection":
        for r in recs:
            out.setdefault(r["arm"], {})[r["row_id"]] = dominant(r["response"], r["items"], int(r["salient_item"]))
    elif kind == "conflict":
        for r in recs:
            out.setdefault(r["arm"], {})[r["row_id"]] = follows_pole(r["response"], capability, r["pole"])
    else:
        poles: dict[tuple[str, str], dict[str, str]] = {}
        for r in recs:
            poles.setdefault((r["arm"], r["prompt_id"]), {})[r["pole"]] = r["response"]
        for (arm, pid), pair in sorted(poles.items()):
            if "+" not in pair or "-" not in pair:
                continue
            if metric == "vader_gap":
                value: Any = vader_compound(pair["+"]) - vader_compound(pair["-"])
            else:
                value = register_gap(pair["+"], pair["-"], capability)
                value = value > 0 if metric == "directional" else value
            out.setdefault(arm, {})[pid] = value
    return {arm: dict(sorted(units.items())) for arm, units in sorted(out.items())}


def paired(scores: dict[str, dict[str, Any]], arm: str, other: str) -> tuple[list[str], list[Any], list[Any]]:
    """Units both arms answered, in sorted order, with each arm's values."""
    a, b = scores.get(arm, {}), scores.get(other, {})
    units = sorted(set(a) & set(b))
    return units, [a[u] for u in units], [b[u] for u in units]
