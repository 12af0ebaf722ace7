"""Channel vs text: the same state carried by the channel (MARS), written into the prompt (TEXT), added to
the residual stream (STEER), or absent (ABLATED), on the same rows; and what writing it as text costs.

Per capability and primary metric: each arm's success rate (Clopper-Pearson 95% CI; an arm with no rows
for a capability, e.g. STEER on selection, has n 0 and no rate), the paired difference for each arm pair
(seeded paired-bootstrap 95% CI over the units both arms answered, and the exact McNemar p on its
discordant units, so STEER vs ABLATED and MARS vs STEER get the test MARS vs ABLATED gets), and
per arm the mean prompt / response tokens; `text_extra_prompt_tokens` is the mean, over rows both
arms answered, of TEXT's prompt tokens minus MARS's.
"""

from __future__ import annotations

from typing import Any

from scorers.outcomes import paired, turn_of, unit_scores
from scorers.persistence import PRIMARY_METRIC
from scorers.stats import bootstrap_mean_ci, clopper_pearson, mcnemar_exact


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


def score_arms(records: list[dict[str, Any]], groups: list[tuple[str, str]], arms: list[str],
               pairs: list[tuple[str, str]], seed: int, resamples: int) -> list[dict[str, Any]]:
    """One row per (capability, kind): success per arm, paired deltas with CIs, token costs (turn 0)."""
    first = [r for r in records if turn_of(r) == 0]
    out = []
    for cap, kind in groups:
        metric = PRIMARY_METRIC[kind]
        scores = unit_scores(first, cap, metric)
        per_arm = {}
        for arm in arms:
            values = list(scores.get(arm, {}).values())
            k, n = sum(bool(v) for v in values), len(values)
            per_arm[arm] = {"n": n, "successes": k, "rate": k / n if n else None,
                            "ci95": list(clopper_pearson(k, n)) if n else None}
        deltas = {}
        for a, b in pairs:
            _, xa, xb = paired(scores, a, b)
            diffs = [float(x) - float(y) for x, y in zip(xa, xb, strict=True)]
            only_a, only_b = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
            deltas[f"{a}-{b}"] = {"n": len(diffs), "delta": _mean(diffs),
                                  "ci95": bootstrap_mean_ci(diffs, seed=seed, resamples=resamples),
                                  "discordant": [only_a, only_b],
                                  "p": mcnemar_exact(only_a, only_b) if diffs else None}
        recs = [r for r in first if r["capability"] == cap and r["kind"] == kind]
        out.append({"capability": cap, "kind": kind, "metric": metric, "arms": per_arm, "deltas": deltas,
                    "tokens": _tokens(recs, arms)})
    return out
