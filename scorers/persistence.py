"""Persistence: does the channel's effect hold further into long responses, and in later turns?

- Segments: each turn-0 response is cut into `n` contiguous, equal word spans; the primary metric
  (dominant / directional / conflict) is scored on each span alone. An effect that only colours the
  opening words fades across the spans; an empty span scores as a miss.
- Turns: the same metric on each follow-up turn's response (generated with the arm's channel still
  set, the conversation so far in the prompt).

Rates per arm, side by side; MARS minus ABLATED per span / turn is the persistence curve.
"""

from __future__ import annotations

from typing import Any

from scorers.outcomes import turn_of, unit_scores

PRIMARY_METRIC = {"selection": "dominant", "register": "directional", "conflict": "conflict"}


def split_segments(text: str, n: int) -> list[str]:
    """`n` contiguous spans of (nearly) equal word counts; spans of a short text may be empty."""
    if n < 1:
        raise ValueError(f"need at least one segment, got {n}")
    words = (text or "").split()
    bounds = [i * len(words) // n for i in range(n + 1)]
    return [" ".join(words[bounds[i]:bounds[i + 1]]) for i in range(n)]


def _rates(records: list[dict[str, Any]], capability: str, metric: str) -> dict[str, tuple[int, int]]:
    """{arm: (successes, units)} of one metric on turn-0-shaped records."""
    return {arm: (sum(bool(v) for v in units.values()), len(units))
            for arm, units in unit_scores(records, capability, metric).items()}


def _rows(groups: list[tuple[str, str]], arms: list[str], slices: list[list[dict[str, Any]]],
          what: str) -> list[dict[str, Any]]:
    out = []
    for cap, kind in groups:
        metric = PRIMARY_METRIC[kind]
        per_slice = [_rates([r for r in recs if r["capability"] == cap and r["kind"] == kind], cap, metric)
                     for recs in slices]
        for arm in arms:
            counts = [s.get(arm, (0, 0)) for s in per_slice]
            if not any(n for _, n in counts):
                continue
            out.append({"capability": cap, "kind": kind, "metric": metric, "arm": arm, "unit": what,
                        "n": [n for _, n in counts], "successes": [k for k, _ in counts],
                        "rates": [k / n if n else None for k, n in counts]})
    return out


def score_persistence(records: list[dict[str, Any]], groups: list[tuple[str, str]], arms: list[str],
                      n_segments: int) -> dict[str, Any]:
    """Primary-metric rates per response segment (turn 0) and per turn, per capability and arm."""
    first = [r for r in records if turn_of(r) == 0]
    segments = [[{**r, "response": split_segments(r["response"], n_segments)[k]} for r in first]
                for k in range(n_segments)]
    turns = sorted({turn_of(r) for r in records})
    by_turn = [[{**r, "turn": 0} for r in records if turn_of(r) == t] for t in turns]
    return {"n_segments": n_segments, "turns": turns,
            "segments": _rows(groups, arms, segments, "segment"),
            "by_turn": _rows(groups, arms, by_turn, "turn") if len(turns) > 1 else []}
