"""What a teacher corpus will cost, before anything is spent (`tinymars cost --estimate`).

The corpus is planned exactly as generation plans it (same prompts, same requests), without a call:
- *expected*: prompt tokens at ~4 UTF-8 bytes per token, completions as long as the template teacher's
  targets (plus the JSON wrapper); reasoning tokens, which some models add, are not in it;
- *worst case*: the bound the budget uses, every prompt token uncached (at 3 bytes per token) and
  `max_tokens` generated, for the first pass and with every target resampled `resamples` times.
Calls already answered in HOME's call cache are free and left out of the remaining cost.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from corpus.call_cache import CallCache
from corpus.teacher_corpus import plan_corpus, plan_keys, request_for, teacher_price
from corpus.teacher_prompts import load_templates

JSON_WRAPPER_CHARS = len('{"target": ""}')


def estimate(section: Any, cache_path: Path | None = None) -> dict[str, Any]:
    """Per capability and in total: calls, cached calls, tokens, expected and worst-case USD (remaining)."""
    teacher = section.teacher
    templates = load_templates(teacher.prompts_dir)
    price = teacher_price(teacher)
    plan = plan_corpus(list(section.capabilities), section.prompts_per_capability,
                       section.conflict_prompts_per_capability, section.seed, templates,
                       heldout_fraction=section.heldout_fraction)
    params = {"temperature": teacher.temperature, "max_tokens": teacher.max_tokens}
    cache = CallCache(cache_path) if cache_path is not None and cache_path.exists() else None
    try:
        cached = cache.keys() if cache else set()
        spent = cache.spent_on(plan_keys(plan, teacher, section.seed, templates)) if cache else 0.0
    finally:
        if cache:
            cache.close()
    zero = {"calls": 0, "cached": 0, "prompt_tokens": 0, "completion_tokens": 0, "expected_usd": 0.0,
            "worst_usd": 0.0}
    per_cap: dict[str, dict[str, Any]] = {}
    for prompt in plan:
        row = per_cap.setdefault(prompt.capability, dict(zero))
        for slot in prompt.slots:
            req = request_for(slot, 0, section.seed, teacher.model, params, templates)
            row["calls"] += 1
            if req.key in cached:
                row["cached"] += 1
                continue
            body = sum(len(m["content"].encode("utf-8")) for m in req.messages)
            prompt_tokens = math.ceil(body / 4) + 4 * len(req.messages)
            completion = min(teacher.max_tokens, math.ceil((slot.typical_chars + JSON_WRAPPER_CHARS) / 4))
            row["prompt_tokens"] += prompt_tokens
            row["completion_tokens"] += completion
            row["expected_usd"] += price.cost(prompt_tokens, completion, 0, teacher.batch)
            row["worst_usd"] += price.worst_case(req.prompt_tokens_est, teacher.max_tokens, teacher.batch)
    total = {k: sum(r[k] for r in per_cap.values()) for k in zero}
    total["worst_usd_with_resamples"] = total["worst_usd"] * (1 + teacher.resamples)
    return {
        "model": teacher.model, "batch": teacher.batch, "free": teacher.free, "price_per_1m": vars(price),
        "max_tokens": teacher.max_tokens, "resamples": teacher.resamples, "max_usd": teacher.max_usd,
        "spent_so_far_usd": spent, "capabilities": per_cap, "total": total,
    }
