"""Per-prompt outcomes of one metric, per arm: the units every test and interval is built on.

The prompt is the unit of analysis everywhere (docs/methods.md, "Units"). Rows of one prompt share its
text and its scenario, so they are not independent: a selection prompt has three rows (one per salient
item), a conflict prompt two (the channel at each pole against the text), a register prompt a + and a
- response. Each metric therefore reduces a prompt's rows in one arm to one number:

- `dominant` (selection): the share of the prompt's rows whose salient item is dominant (0, 1/3, 2/3, 1).
- `directional` (register): the sign of the lexicon gap, +1 / 0 / -1 (the + response reads more like the
  + pole, a tie, or the other way round). Signed, so a loss and a tie are never merged.
- `gap` / `vader_gap` (register): the lexicon gap (+ score minus - score) / the VADER compound gap.
- `conflict`: the share of the prompt's conflict rows whose response follows the channel's pole.
- `conflict_pair`: 1 when every conflict row of the prompt follows the channel (the channel decides which
  output the prompt gets, whichever pole the text asserts), else 0; chance is 1/4 for two rows.

Comparisons between arms pair the same prompt: the difference of the two arms' values is the unit.
Only turn-0 records are read here (follow-up turns go through `scorers.persistence`).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from scorers.register import follows_pole, register_gap, vader_compound
from scorers.selection import dominant
from tinymars.domain import METRIC_CAPABILITIES

METRIC_KIND = {"dominant": "selection", "directional": "register", "gap": "register", "vader_gap": "register",
               "conflict": "conflict", "conflict_pair": "conflict"}
PRIMARY_METRIC = {"selection": "dominant", "register": "directional", "conflict": "conflict"}
SIGNED_METRICS = ("directional", "gap", "vader_gap")  # values below zero exist: the wrong direction
MAGNITUDE_METRICS = ("gap", "vader_gap")  # unbounded: tested by signed ranks, measured in d_z


def applies(metric: str, capability: str) -> bool:
    """Whether `metric` is defined for `capability` (tinymars.domain.METRIC_CAPABILITIES; VADER: affect only)."""
    if metric not in METRIC_KIND:
        raise ValueError(f"unknown metric {metric!r}; known: {', '.join(METRIC_KIND)}")
    return capability in METRIC_CAPABILITIES[metric]


def turn_of(record: dict[str, Any]) -> int:
    """Records written before follow-up turns existed carry no `turn`: they are turn 0."""
    return int(record.get("turn") or 0)


def _sign(x: float) -> float:
    return float((x > 0) - (x < 0))


def row_outcome(record: dict[str, Any], metric: str) -> bool:
    """The binary outcome of one selection or conflict row (dominant; follows the channel's pole)."""
    if METRIC_KIND[metric] == "selection":
        return dominant(record["response"], record["items"], int(record["salient_item"]))
    return follows_pole(record["response"], record["capability"], record["pole"])


def prompt_units(records: list[dict[str, Any]], capability: str, metric: str) -> dict[str, dict[str, float]]:
    """{arm: {prompt id: value}} for one capability and metric, from records of one turn.

    Callers pass turn-0 records (or one follow-up turn relabelled as turn 0, or response segments).
    A register prompt counts only when the arm has both its + and its - response; a conflict_pair prompt
    only when it has at least two rows.
    """
    kind = METRIC_KIND[metric]
    recs = [r for r in records if r["capability"] == capability and r["kind"] == kind and turn_of(r) == 0]
    out: dict[str, dict[str, float]] = {}
    if kind in ("selection", "conflict"):
        rows: dict[tuple[str, str], list[bool]] = defaultdict(list)
        for r in sorted(recs, key=lambda r: (r["arm"], r["prompt_id"], r["row_id"])):
            rows[(r["arm"], r["prompt_id"])].append(row_outcome(r, metric))
        for (arm, pid), hits in rows.items():
            if metric == "conflict_pair":
                if len(hits) < 2:
                    continue
                value = float(all(hits))
            else:
                value = sum(hits) / len(hits)
            out.setdefault(arm, {})[pid] = value
    else:
        poles: dict[tuple[str, str], dict[str, str]] = {}
        for r in recs:
            poles.setdefault((r["arm"], r["prompt_id"]), {})[r["pole"]] = r["response"]
        for (arm, pid), pair in sorted(poles.items()):
            if "+" not in pair or "-" not in pair:
                continue
            if metric == "vader_gap":
                value = vader_compound(pair["+"]) - vader_compound(pair["-"])
            else:
                value = register_gap(pair["+"], pair["-"], capability)
                value = _sign(value) if metric == "directional" else value
            out.setdefault(arm, {})[pid] = float(value)
    return {arm: dict(sorted(units.items())) for arm, units in sorted(out.items())}


def paired(units: dict[str, dict[str, float]], arm: str, other: str) -> tuple[list[str], list[float]]:
    """Prompts both arms answered, in sorted order, with the paired difference (arm minus other) of each."""
    a, b = units.get(arm, {}), units.get(other, {})
    common = sorted(set(a) & set(b))
    return common, [a[u] - b[u] for u in common]


def row_count(records: list[dict[str, Any]], capability: str, kind: str, arm: str) -> int:
    """How many turn-0 rows an arm has for a capability and kind (the report shows rows beside prompts)."""
    return sum(1 for r in records if r["capability"] == capability and r["kind"] == kind and r["arm"] == arm
               and turn_of(r) == 0)
