"""Channel vs text: the same state carried by the channel (MARS), written into the prompt (TEXT), added to
the residual stream (STEER), or absent (ABLATED), on the same prompts; and what writing it as text costs.

Per capability and primary metric, on per-prompt units (`scorers.outcomes`): each arm's mean value (the
dominant / follows-the-channel rate, or for register prompts the net direction = (wins - losses) / prompts,
so a tie never counts as a loss) with a 95% bootstrap interval over prompts; for each arm pair the mean
per-prompt difference (bootstrap 95% CI over prompts) and the two-sided sign test on the prompts where the
two arms differ. Per arm the mean prompt / response tokens; `text_extra_prompt_tokens` is the mean, over
rows both arms answered, of TEXT's prompt tokens minus MARS's.
"""

from __future__ import annotations

from typing import Any

from scorers.outcomes import PRIMARY_METRIC, paired, prompt_units, row_count, turn_of
from scorers.stats import bootstrap_mean_ci, sign_counts, sign_test_two_sided


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def mean_tokens(records: list[dict[str, Any]], arms: list[str]) -> dict[str, Any]:
    """Mean prompt / response tokens per arm: the token cost of writing a state as text shows up here."""
    out: dict[str, Any] = {}
    for arm in arms:
        recs = [r for r in records if r["arm"] == arm]
        out[arm] = {f"mean_{f}": _mean([r[f] for r in recs if r.get(f) is not None])
                    for f in ("prompt_tokens", "response_tokens")}
    return out


def _tokens(records: list[dict[str, Any]], arms: list[str]) -> dict[str, Any]:
    out = mean_tokens(records, arms)
    prompt = {(r["row_id"], r["arm"]): r.get("prompt_tokens") for r in records}
    extra = [prompt[(rid, "text")] - prompt[(rid, "mars")] for rid, arm in prompt
             if arm == "text" and prompt.get((rid, "mars")) is not None and prompt[(rid, "text")] is not None]
    out["text_extra_prompt_tokens"] = _mean(extra)
    return out


def compare_arms(units: dict[str, dict[str, float]], a: str, b: str, boot: dict[str, int]) -> dict[str, Any]:
    """Mean per-prompt difference a - b, its bootstrap CI over prompts, the two-sided sign test."""
    _, diffs = paired(units, a, b)
    wins, losses = sign_counts(diffs)
    return {"n": len(diffs), "delta": _mean(diffs), "ci95": bootstrap_mean_ci(diffs, **boot),
            "discordant": [wins, losses], "p": sign_test_two_sided(wins, losses) if diffs else None}


def score_arms(records: list[dict[str, Any]], groups: list[tuple[str, str]], arms: list[str],
               pairs: list[tuple[str, str]], seed: int, resamples: int) -> list[dict[str, Any]]:
    """One row per (capability, kind): each arm's mean per-prompt value, paired deltas with CIs, token costs."""
    first = [r for r in records if turn_of(r) == 0]
    boot = {"seed": seed, "resamples": resamples}
    out = []
    for cap, kind in groups:
        metric = PRIMARY_METRIC[kind]
        units = prompt_units(first, cap, metric)
        per_arm = {}
        for arm in arms:
            values = list(units.get(arm, {}).values())
            per_arm[arm] = {"prompts": len(values), "rows": row_count(first, cap, kind, arm), "rate": _mean(values),
                            "ci95": bootstrap_mean_ci(values, **boot)}
        deltas = {f"{a}-{b}": compare_arms(units, a, b, boot) for a, b in pairs}
        recs = [r for r in first if r["capability"] == cap and r["kind"] == kind]
        out.append({"capability": cap, "kind": kind, "metric": metric,
                    "value": "net direction" if kind == "register" else f"{metric} rate",
                    "arms": per_arm, "deltas": deltas, "tokens": _tokens(recs, arms)})
    return out
