"""Generate eval responses for each arm on the same held-out rows (MARS = real channel, ABLATED = zeroed).

Plain torch, no Prefect: a notebook can call `generate_arms` on any trained model.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from models.generate import generate


def select_eval_rows(rows: list[dict[str, Any]], max_prompts_per_capability: int | None) -> list[int]:
    """Indices of held-out rows (conflict rows included), at most N prompts per capability and kind."""
    chosen: list[int] = []
    prompts: dict[tuple[str, str], list[str]] = defaultdict(list)
    for i, row in enumerate(rows):
        if row["split"] != "heldout":
            continue
        group = prompts[(row["capability"], row["kind"])]
        if row["prompt_id"] not in group:
            if max_prompts_per_capability is not None and len(group) >= max_prompts_per_capability:
                continue
            group.append(row["prompt_id"])
        chosen.append(i)
    return chosen


def channel_tensor(mats: dict[str, np.ndarray], names: list[str], dim: int, index: list[int]) -> torch.Tensor:
    """Stack the named channel matrices for the chosen rows into `[N, C, D]` (zero padded)."""
    out = torch.zeros(len(index), len(names), dim)
    for c, name in enumerate(names):
        m = torch.from_numpy(mats[name][index])
        out[:, c, : m.shape[1]] = m
    return out


@torch.no_grad()
def generate_arms(
    model: torch.nn.Module,
    tok: Any,
    rows: list[dict[str, Any]],
    mats: dict[str, np.ndarray],
    names: list[str],
    dim: int,
    index: list[int],
    arms: list[str],
    max_new_tokens: int,
    batch_size: int,
    progress: Callable[[str], None] = lambda _: None,
) -> list[dict[str, Any]]:
    """One record per (row, arm): the response and everything a scorer needs to re-score it offline."""
    model.eval()
    prompts = [tok.prompt_ids(rows[i]["prompt"]) for i in index]
    real = channel_tensor(mats, names, dim, index)
    records = []
    for arm in arms:
        chans = real if arm == "mars" else torch.zeros_like(real)
        progress(f"generating {len(prompts)} responses for arm {arm}")
        outs = generate(model, prompts, chans, max_new_tokens, tok.eos_id, tok.pad_id, batch_size=batch_size)
        for i, prompt_ids, new in zip(index, prompts, outs, strict=True):
            row = rows[i]
            records.append(
                {
                    "row_id": row["row_id"],
                    "prompt_id": row["prompt_id"],
                    "capability": row["capability"],
                    "kind": row["kind"],
                    "arm": arm,
                    "pole": row.get("pole"),
                    "text_pole": row.get("text_pole"),
                    "salient_item": row.get("salient_item"),
                    "items": row.get("items") or [],
                    "channel_state": row["channel_state"],
                    "prompt": row["prompt"],
                    "response": tok.decode(new),
                    "prompt_tokens": len(prompt_ids),
                    "response_tokens": len(new),
                }
            )
    return records
