"""Persistence: does the channel's effect hold further into long responses, and in later turns?

- Segments: each turn-0 response is cut into `n` contiguous, equal word spans; the primary metric
  (dominant / directional / conflict) is scored on each span alone, per prompt. An effect that only
  colours the opening words fades across the spans; an empty span scores as a miss (a tie for register).
- Turns: the same metric on each follow-up turn's response (the conversation so far in the prompt).
- Carry-over, the test: at turn k >= 1 MARS keeps its channel set, and the `mars_cut` arm answers the
  *same* conversation (MARS's own turn 0) with the channel zeroed. Both see identical text, so their
  per-prompt difference is what the channel still adds at turn k, not what copying the conversation
  carries. One-sided sign test on the per-prompt differences (MARS over MARS_CUT), mean difference with a
  bootstrap 95% CI over prompts.

Values are per-prompt means (`scorers.outcomes.prompt_units`): a rate, or for register the net direction.
"""

from __future__ import annotations

from typing import Any

from scorers.outcomes import PRIMARY_METRIC, paired, prompt_units, turn_of
from scorers.stats import bootstrap_mean_ci, sign_counts, sign_test
from tinymars.domain import CUT_ARM  # models.eval_arms: MARS's turn 0, then the channel zeroed from turn 1 on


def split_segments(text: str, n: int) -> list[str]:
    """`n` contiguous spans of (nearly) equal word counts; spans of a short text may be empty."""
    if n < 1:
        raise ValueError(f"need at least one segment, got {n}")
    words = (text or "").split()
    bounds = [i * len(words) // n for i in range(n + 1)]
    return [" ".join(words[bounds[i]:bounds[i + 1]]) for i in range(n)]


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _rows(groups: list[tuple[str, str]], arms: list[str], slices: list[list[dict[str, Any]]],
          what: str) -> list[dict[str, Any]]:
    out = []
    for cap, kind in groups:
        metric = PRIMARY_METRIC[kind]
        per_slice = [prompt_units(recs, cap, metric) for recs in slices]
        for arm in arms:
            values = [list(s.get(arm, {}).values()) for s in per_slice]
            if not any(values):
                continue
            out.append({"capability": cap, "kind": kind, "metric": metric, "arm": arm, "unit": what,
                        "n": [len(v) for v in values], "rates": [_mean(v) for v in values]})
    return out


def _carry(groups: list[tuple[str, str]], turns: list[int], by_turn: list[list[dict[str, Any]]],
           boot: dict[str, int]) -> list[dict[str, Any]]:
    out = []
    for cap, kind in groups:
        metric = PRIMARY_METRIC[kind]
        for turn, recs in zip(turns, by_turn, strict=True):
            units = prompt_units(recs, cap, metric)
            if turn == 0 or CUT_ARM not in units or "mars" not in units:
                continue
            _, diffs = paired(units, "mars", CUT_ARM)
            wins, losses = sign_counts(diffs)
            out.append({"capability": cap, "kind": kind, "metric": metric, "turn": turn, "n": len(diffs),
                        "mars": _mean([units["mars"][p] for p in units["mars"] if p in units[CUT_ARM]]),
                        CUT_ARM: _mean([units[CUT_ARM][p] for p in units[CUT_ARM] if p in units["mars"]]),
                        "delta": _mean(diffs), "ci95": bootstrap_mean_ci(diffs, **boot),
                        "wins": wins, "losses": losses, "p": sign_test(wins, losses)})
    return out


def score_persistence(records: list[dict[str, Any]], groups: list[tuple[str, str]], arms: list[str],
                      n_segments: int, seed: int = 0, resamples: int = 2000) -> dict[str, Any]:
    """Primary-metric values per response segment (turn 0) and per turn, and the carry-over test per turn."""
    first = [r for r in records if turn_of(r) == 0]
    segments = [[{**r, "response": split_segments(r["response"], n_segments)[k]} for r in first]
                for k in range(n_segments)]
    turns = sorted({turn_of(r) for r in records})
    by_turn = [[{**r, "turn": 0} for r in records if turn_of(r) == t] for t in turns]
    turn_arms = [*arms, CUT_ARM] if any(r["arm"] == CUT_ARM for r in records) else arms
    return {"n_segments": n_segments, "turns": turns,
            "segments": _rows(groups, arms, segments, "segment"),
            "by_turn": _rows(groups, turn_arms, by_turn, "turn") if len(turns) > 1 else [],
            "carry": _carry(groups, turns, by_turn, {"seed": seed, "resamples": resamples})}
