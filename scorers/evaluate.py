"""Score saved eval generations into per-capability verdicts (pure, re-runnable offline on generations.jsonl).

A record: ``{row_id, prompt_id, capability, kind, arm, turn, channel, pole, text_pole, salient_item, items,
channel_state, prompt, response, prompt_tokens, response_tokens}`` (`turn` absent means 0). Arms are
paired on the same rows: ``mars`` (real channel) against ``ablated`` (channel zeroed); any further
arm (``text``: the state written into the prompt; ``steer``: the state added to the residual stream,
which covers only affect / time / ethics rows) is scored alongside, on the rows it has.

These per-capability tables describe; the pre-registered hypotheses (`scorers.hypotheses`) decide. The
prompt is the unit of every test (docs/methods.md):
- selection: `dominant` per row; the row table of MARS vs ABLATED (both / only one / neither) is shown,
  the p is the one-sided sign test on per-prompt differences of the dominant rate (each prompt has three
  rows, so rows are not independent units).
- register: per arm and prompt, the + and - responses; directional wins / losses / ties, reliability
  (% wins), mean lexicon gap (and VADER gap for affect), one-sided sign test on wins vs losses.
- conflict: per arm, rows whose response follows the channel pole (nonzero score of that sign); the
  p is the one-sided t-test of per-prompt rates against 0.5 (two rows per prompt); pair level, the share
  of prompts whose two rows both follow the channel (Clopper-Pearson), and for each arm but ABLATED the
  one-sided sign test of that arm over ABLATED on those per-prompt pair outcomes. The reference systems
  quote pair rates against chance 1/4; that is not a valid null (docs/methods.md), so no p is given for it.

Each capability's block carries flat headline numbers first (for lineage metrics), then the tables.
Everything is plain JSON types with a fixed key order.

`score_all` is the one entry point of the eval stage and of `tinymars score`: generations + the
settings the profile pre-registered + the few measurements that needed a model (held-out losses,
gates) -> every figure and verdict of the report, deterministically (bootstrap seeded).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from scorers.arms import mean_tokens, score_arms
from scorers.hypotheses import evaluate_hypotheses
from scorers.markdown import format_markdown
from scorers.outcomes import paired, prompt_units, turn_of
from scorers.persistence import score_persistence
from scorers.register import follows_pole, register_gap, vader_compound
from scorers.relief import score_relief
from scorers.selection import dominant
from scorers.similarity import score_similarity
from scorers.stats import clopper_pearson, rate_interval, sign_counts, sign_test, t_test_greater
from tinymars.domain import CAPABILITIES

__all__ = ["CAPABILITY_ORDER", "DEFAULT_SETTINGS", "format_markdown", "score_all", "score_generations"]

CAPABILITY_ORDER = CAPABILITIES  # report order
BASE_ARMS = ("mars", "ablated")
ARM_ORDER = (*BASE_ARMS, "text", "steer")  # report order; an arm unknown here comes after, sorted


def _arm_order(arms: set[str]) -> list[str]:
    return [a for a in ARM_ORDER if a in arms] + sorted(arms - set(ARM_ORDER))


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _rate(k: int, n: int) -> float | None:
    return k / n if n else None


def _ci(k: int, n: int) -> list[float] | None:
    return list(clopper_pearson(k, n, 0.05)) if n else None


def _index(records: list[dict[str, Any]], key: tuple[str, ...]) -> dict[tuple, dict[str, Any]]:
    out: dict[tuple, dict[str, Any]] = {}
    for rec in records:
        k = tuple(rec[f] for f in key)
        if k in out:
            raise ValueError(f"duplicate generation record for {dict(zip(key, k, strict=True))}")
        out[k] = rec
    return out


def score_selection(records: list[dict[str, Any]], alpha: float) -> dict[str, Any]:
    """Dominant rate per arm, and the paired MARS vs ABLATED table on rows both arms answered."""
    by_key = _index(records, ("row_id", "arm"))
    hit = {
        key: dominant(rec["response"], rec["items"], int(rec["salient_item"])) for key, rec in by_key.items()
    }
    per_arm = {}
    for arm in _arm_order({r["arm"] for r in records}):
        n = sum(a == arm for _, a in hit)
        k = sum(v for (_, a), v in hit.items() if a == arm)
        per_arm[arm] = {"n": n, "dominant": k, "rate": _rate(k, n), "ci95": _ci(k, n)}
    rows = sorted({rid for rid, _ in hit})
    paired = [rid for rid in rows if (rid, "mars") in hit and (rid, "ablated") in hit]
    table = {"both": 0, "mars_only": 0, "ablated_only": 0, "neither": 0}
    for rid in paired:
        m, a = hit[(rid, "mars")], hit[(rid, "ablated")]
        table["both" if m and a else "mars_only" if m else "ablated_only" if a else "neither"] += 1
    n = len(paired)
    mars_rate = _rate(table["both"] + table["mars_only"], n)
    abl_rate = _rate(table["both"] + table["ablated_only"], n)
    cap = records[0]["capability"] if records else ""
    _, diffs = _prompt_diffs(records, cap, "dominant")
    wins, losses = sign_counts(diffs)
    p = sign_test(wins, losses)
    return {
        "kind": "selection",
        "n": n,
        "prompts": len(diffs),
        "mars_dominant_rate": mars_rate,
        "ablated_dominant_rate": abl_rate,
        "delta_pp": None if n == 0 else 100.0 * (mars_rate - abl_rate),
        "prompts_mars_better": wins,
        "prompts_ablated_better": losses,
        "p": p,
        "significant": bool(p < alpha),
        "unpaired_rows": len(rows) - n,
        "mcnemar": table,
        "arms": per_arm,
    }


def _prompt_diffs(records: list[dict[str, Any]], capability: str, metric: str) -> tuple[list[str], list[float]]:
    """Per-prompt MARS minus ABLATED differences of a metric (turn-0 records of one capability)."""
    return paired(prompt_units(records, capability, metric), "mars", "ablated")


def _register_arm(pairs: list[tuple[str, str]], capability: str) -> dict[str, Any]:
    gaps = [register_gap(plus, minus, capability) for plus, minus in pairs]
    wins = sum(g > 0 for g in gaps)
    losses = sum(g < 0 for g in gaps)
    out: dict[str, Any] = {
        "pairs": len(pairs),
        "wins": wins,
        "losses": losses,
        "ties": len(pairs) - wins - losses,
        "reliability": None if not pairs else 100.0 * wins / len(pairs),
        "ci95": _ci(wins, len(pairs)),
        "mean_gap": _mean(gaps),
        "p": sign_test(wins, losses),
    }
    if capability == "affect":
        vgaps = [vader_compound(plus) - vader_compound(minus) for plus, minus in pairs]
        out["vader_wins"] = sum(g > 0 for g in vgaps)
        out["vader_mean_gap"] = _mean(vgaps)
    return out


def score_register(records: list[dict[str, Any]], capability: str, alpha: float) -> dict[str, Any]:
    """Directional test per arm over prompts that have both a + and a - response in that arm."""
    by_key = _index(records, ("prompt_id", "arm", "pole"))
    arms = _arm_order({r["arm"] for r in records})
    prompts = sorted({r["prompt_id"] for r in records})
    per_arm = {}
    for arm in arms:
        pairs = [
            (by_key[(pid, arm, "+")]["response"], by_key[(pid, arm, "-")]["response"])
            for pid in prompts
            if (pid, arm, "+") in by_key and (pid, arm, "-") in by_key
        ]
        per_arm[arm] = _register_arm(pairs, capability)
    mars = per_arm.get("mars", {})
    return {
        "kind": "register",
        "n": mars.get("pairs", 0),
        "mars_reliability": mars.get("reliability"),
        "ablated_reliability": per_arm.get("ablated", {}).get("reliability"),
        "mars_mean_gap": mars.get("mean_gap"),
        "p": mars.get("p", 1.0),
        "significant": bool(mars.get("p", 1.0) < alpha and mars.get("wins", 0) > mars.get("losses", 0)),
        "arms": per_arm,
    }


def score_conflict(records: list[dict[str, Any]], capability: str, alpha: float) -> dict[str, Any]:
    """Per arm: how often the response takes the channel's pole over the pole the prompt text asserts."""
    _index(records, ("row_id", "arm"))
    arms = _arm_order({r["arm"] for r in records})
    rates = prompt_units(records, capability, "conflict")
    pairs = prompt_units(records, capability, "conflict_pair")
    per_arm = {}
    for arm in arms:
        recs = sorted((r for r in records if r["arm"] == arm), key=lambda r: r["row_id"])
        k = sum(follows_pole(r["response"], capability, r["pole"]) for r in recs)
        k_text = sum(
            follows_pole(r["response"], capability, r["text_pole"]) for r in recs if r.get("text_pole")
        )
        prompt_rates = list(rates.get(arm, {}).values())
        decided = list(pairs.get(arm, {}).values())
        wins, losses = sign_counts(paired(pairs, arm, "ablated")[1]) if arm != "ablated" else (0, 0)
        per_arm[arm] = {
            "n": len(recs),
            "prompts": len(prompt_rates),
            "follows_channel": k,
            "follows_text": k_text,
            "rate": _rate(k, len(recs)),
            "ci95": rate_interval(prompt_rates),
            "p": t_test_greater(prompt_rates, 0.5),
            "pairs": len(decided),
            "channel_decides": int(sum(decided)),
            "pair_rate": _rate(int(sum(decided)), len(decided)),
            "pair_ci95": _ci(int(sum(decided)), len(decided)),
            "pair_p": sign_test(wins, losses) if arm != "ablated" else None,
        }
    mars = per_arm.get("mars", {})
    return {
        "n": mars.get("n", 0),
        "rate": mars.get("rate"),
        "p": mars.get("p", 1.0),
        "pair_rate": mars.get("pair_rate"),
        "pair_p": mars.get("pair_p") if mars.get("pair_p") is not None else 1.0,
        "significant": bool(mars.get("p", 1.0) < alpha),
        "arms": per_arm,
    }


def score_generations(records: list[dict[str, Any]], alpha: float = 0.01) -> dict[str, Any]:
    """Per-capability verdicts, capabilities in the canonical order (unknown ones after, sorted).

    Only turn-0 records count here; follow-up turns are scored by `scorers.persistence`.
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    records = [r for r in records if turn_of(r) == 0]
    groups: dict[str, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for rec in records:
        groups[rec["capability"]][rec["kind"]].append(rec)
    caps = [c for c in CAPABILITY_ORDER if c in groups] + sorted(set(groups) - set(CAPABILITY_ORDER))
    out: dict[str, Any] = {}
    for cap in caps:
        kinds = groups[cap]
        unknown = sorted(set(kinds) - {"selection", "register", "conflict"})
        if unknown:
            raise ValueError(f"{cap}: unknown record kind(s) {unknown}")
        block: dict[str, Any] = {}
        if kinds.get("selection"):
            block.update(score_selection(kinds["selection"], alpha))
        if kinds.get("register"):
            block.update(score_register(kinds["register"], cap, alpha))
        if kinds.get("conflict"):
            conflict = score_conflict(kinds["conflict"], cap, alpha)
            block.update(
                {"conflict_n": conflict["n"], "conflict_rate": conflict["rate"], "conflict_p": conflict["p"],
                 "conflict_pair_rate": conflict["pair_rate"], "conflict_pair_p": conflict["pair_p"]}
            )
            block["conflict"] = conflict
        block["alpha"] = alpha
        all_recs = [r for kind in ("selection", "register", "conflict") for r in kinds.get(kind, [])]
        block["tokens"] = mean_tokens(all_recs, _arm_order({r["arm"] for r in all_recs}))
        out[cap] = block
    return out


KINDS = ("selection", "register", "conflict")
ARM_PAIRS = (("mars", "ablated"), ("mars", "text"), ("text", "ablated"), ("steer", "ablated"), ("mars", "steer"))
DEFAULT_SETTINGS: dict[str, Any] = {"alpha": 0.01, "hypotheses": [], "bootstrap_seed": 0,
                                    "bootstrap_resamples": 2000, "persistence_segments": 3}


def _settings(settings: dict[str, Any] | None) -> dict[str, Any]:
    unknown = sorted(set(settings or {}) - set(DEFAULT_SETTINGS))
    if unknown:
        raise ValueError(f"unknown scoring setting(s) {unknown}; allowed: {sorted(DEFAULT_SETTINGS)}")
    return {**DEFAULT_SETTINGS, **(settings or {})}


def _gates(gates: dict[str, Any] | None) -> dict[str, Any]:
    """The measured gates plus each channel's L2 norm over layers (which channel the model listens to)."""
    if not gates:
        return {}
    per_layer = gates["per_layer"]
    per_channel = [sum(layer[c] ** 2 for layer in per_layer) ** 0.5 for c in range(len(gates["channel_names"]))]
    return {**gates, "per_channel_l2": dict(zip(gates["channel_names"], per_channel, strict=True))}


def score_all(records: list[dict[str, Any]], settings: dict[str, Any] | None = None,
              measurements: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every figure and verdict of an iteration's evaluation, from its saved generations alone (plus the
    measured losses and gates, which needed the model). Same inputs, same output, byte for byte."""
    cfg = _settings(settings)
    meas = measurements or {}
    first = [r for r in records if turn_of(r) == 0]
    capabilities = score_generations(records, alpha=cfg["alpha"])
    kinds = {(r["capability"], r["kind"]) for r in first}
    groups = [(cap, kind) for cap in capabilities for kind in KINDS if (cap, kind) in kinds]
    arms = _arm_order({r["arm"] for r in first})  # mars_cut exists from turn 1 on: persistence shows it
    pairs = [(a, b) for a, b in ARM_PAIRS if a in arms and b in arms]
    boot = {"seed": cfg["bootstrap_seed"], "resamples": cfg["bootstrap_resamples"]}
    return {
        "model": meas.get("model"),
        "settings": cfg,
        "n_records": len(records),
        "arms": arms,
        "capabilities": capabilities,
        "hypotheses": evaluate_hypotheses(records, cfg["hypotheses"], groups, **boot),
        "channel_vs_text": score_arms(records, groups, arms, pairs, **boot),
        "persistence": score_persistence(records, groups, arms, cfg["persistence_segments"], **boot),
        "similarity": score_similarity(records, list(capabilities), pairs),
        "relief": score_relief(meas.get("relief", {}), meas.get("model")),
        "gates": _gates(meas.get("gates")),
        # how the STEER arm was injected (layer, multiplier, ...); absent for runs without it (old scores re-check)
        **({"steer": meas["steer"]} if meas.get("steer") else {}),
    }


VERDICT_CODE = {"supported": 1.0, "inconclusive": 0.5, "not supported": 0.0}  # a verdict as one number


def headline_metrics(scores: dict[str, Any]) -> dict[str, float]:
    """Flat numbers for the lineage metrics table and `tinymars compare` (the full tables stay in scores.json)."""
    out: dict[str, float] = {}
    for cap, block in scores["capabilities"].items():
        for k, v in block.items():
            if isinstance(v, int | float) and not isinstance(v, bool):
                out[f"{cap}.{k}"] = float(v)
    for row in scores["channel_vs_text"]:
        for arm, a in row["arms"].items():
            if a["rate"] is not None:
                out[f"{row['capability']}.{row['kind']}.{arm}_rate"] = float(a["rate"])
        extra = row["tokens"].get("text_extra_prompt_tokens")
        if extra is not None:
            out[f"{row['capability']}.{row['kind']}.text_extra_prompt_tokens"] = float(extra)
    for h in scores["hypotheses"]:
        out[f"hypothesis.{h['id']}.verdict"] = VERDICT_CODE[h["verdict"]]
        for m in h["members"]:
            out[f"hypothesis.{h['id']}.{m['capability']}.p_holm"] = float(m["p_holm"])
    for name, r in scores["relief"]["models"].items():
        out[f"relief.{name}.zeroed_nats"] = float(r["channels_zeroed"]["nats_per_token"])
        if r["channels_zeroed"].get("bits_per_byte") is not None:
            out[f"relief.{name}.zeroed_bpb"] = float(r["channels_zeroed"]["bits_per_byte"])
    if scores["gates"]:
        out["gates.alpha_l2"] = float(scores["gates"]["alpha_l2"])
    return out
