"""What a teacher corpus will cost, before anything is spent (`tinymars cost --estimate`).

The corpus is planned exactly as generation plans it (same prompts, same requests), without a call:
- *expected*: prompt tokens at ~4 UTF-8 bytes per token, completions as long as the template teacher's
  targets (plus the JSON wrapper); reasoning tokens, which some models add, are not in it;
- *worst case*: the bound the budget uses, every prompt token uncached (at 3 bytes per token) and
  `max_tokens` generated, for the first pass and with every target resampled `resamples` times.
Calls already answered in HOME's call cache are free and left out of the remaining cost.
With a scenario phase (`corpus.teacher.scenarios`) its first round of calls is a row of its own
(`scenarios`, completions as long as `per_call` shipped entities in JSON, worst case its own `max_tokens`),
and the target calls are priced on the prompts a run would plan: from the generated pools once every
scenario call is answered in the call cache (replayed from there, no call), else from the shipped pools
(the generated entities are not known before their calls; the plan has the same shape and call count).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from corpus.call_cache import CallCache
from corpus.scenarios import (
    CAPABILITY,
    cached_scenarios,
    first_round,
    scenario_params,
    scenario_request,
    shipped_examples,
)
from corpus.teacher_corpus import plan_keys, request_for, section_plan, teacher_price
from corpus.teacher_prompts import load_templates

JSON_WRAPPER_CHARS = len('{"target": ""}')


def estimate(section: Any, cache_path: Path | None = None) -> dict[str, Any]:
    """Per capability and in total: calls, cached calls, tokens, expected and worst-case USD (remaining)."""
    teacher = section.teacher
    templates = load_templates(teacher.prompts_dir)
    price = teacher_price(teacher)
    cache = CallCache(cache_path) if cache_path is not None and cache_path.exists() else None
    try:
        scenarios = cached_scenarios(section, templates, cache) if cache and teacher.scenarios else None
        return _estimate(section, templates, price, cache, scenarios)
    finally:
        if cache:
            cache.close()


def _estimate(section: Any, templates: Any, price: Any, cache: CallCache | None, scenarios: Any) -> dict[str, Any]:
    teacher = section.teacher
    plan = section_plan(section, templates, scenarios)
    params = {"temperature": teacher.temperature, "max_tokens": teacher.max_tokens}
    scenario_calls = [] if teacher.scenarios is None else [
        (scenario_request(b, section.seed, teacher.model, scenario_params(teacher), templates),
         b.count * _entity_chars(b.pool) + len('{"entities": []}'), teacher.scenarios.max_tokens)
        for b in first_round(section, templates)]
    calls = [(CAPABILITY, req, chars, limit) for req, chars, limit in scenario_calls] + [
        (prompt.capability, request_for(slot, 0, section.seed, teacher.model, params, templates),
         slot.typical_chars + JSON_WRAPPER_CHARS, teacher.max_tokens)
        for prompt in plan for slot in prompt.slots]
    cached = cache.keys() if cache else set()
    keys = plan_keys(plan, teacher, section.seed, templates) + [req.key for req, _, _ in scenario_calls]
    spent = cache.spent_on(keys) if cache else 0.0
    zero = {"calls": 0, "cached": 0, "prompt_tokens": 0, "completion_tokens": 0, "expected_usd": 0.0,
            "worst_usd": 0.0}
    per_cap: dict[str, dict[str, Any]] = {}
    for capability, req, typical_chars, max_tokens in calls:
        row = per_cap.setdefault(capability, dict(zero))
        row["calls"] += 1
        if req.key in cached:
            row["cached"] += 1
            continue
        body = sum(len(m["content"].encode("utf-8")) for m in req.messages)
        prompt_tokens = math.ceil(body / 4) + 4 * len(req.messages)
        completion = min(max_tokens, math.ceil(typical_chars / 4))
        row["prompt_tokens"] += prompt_tokens
        row["completion_tokens"] += completion
        row["expected_usd"] += price.cost(prompt_tokens, completion, 0, teacher.batch)
        row["worst_usd"] += price.worst_case(req.prompt_tokens_est, max_tokens, teacher.batch)
    total = {k: sum(r[k] for r in per_cap.values()) for k in zero}
    total["worst_usd_with_resamples"] = total["worst_usd"] * (1 + teacher.resamples)
    return {
        "model": teacher.model, "batch": teacher.batch, "free": teacher.free, "price_per_1m": vars(price),
        "max_tokens": teacher.max_tokens, "resamples": teacher.resamples, "max_usd": teacher.max_usd,
        "spent_so_far_usd": spent, "capabilities": per_cap, "total": total,
    }


def _entity_chars(pool: str) -> int:
    """The mean JSON length of one shipped entity of `pool` (what a generated one is expected to be)."""
    import json

    shipped = shipped_examples(pool)
    return math.ceil(sum(len(json.dumps(e, ensure_ascii=False)) + 2 for e in shipped) / len(shipped))
