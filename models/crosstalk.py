"""Crosstalk generations: a channel model's responses on capability Y's held-out prompts with another channel X
held at one of two of its states (scorers.crosstalk builds the matrix from them).

X's two states are real channel vectors from X's own held-out rows: a register channel's + and - pole of
one prompt, a selection channel's first two items of one prompt. Y's own channel keeps each row's state, so
the pair of generations differs in channel X alone. Generation is the eval's (models.generate.generate).
Plain torch, no Prefect.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from models.eval_arms import _record, channel_tensor
from models.generate import GREEDY, Sampling, generate
from tinymars.domain import REGISTER_CAPABILITIES, crosstalk_arm


def channel_states(rows: list[dict[str, Any]], index: list[int], channel: str) -> tuple[int, int] | None:
    """Row indices whose `channel` vectors are its two states (a, b), from the first held-out prompt that has both."""
    by_prompt: dict[str, dict[Any, int]] = {}
    for i in index:
        row = rows[i]
        if row["capability"] != channel or row["kind"] == "conflict":
            continue
        key = row.get("pole") if channel in REGISTER_CAPABILITIES else row.get("salient_item")
        by_prompt.setdefault(row["prompt_id"], {}).setdefault(key, i)
    want = ("+", "-") if channel in REGISTER_CAPABILITIES else (0, 1)
    for states in by_prompt.values():
        if all(w in states for w in want):
            return states[want[0]], states[want[1]]
    return None


@torch.no_grad()
def generate_crosstalk(model: torch.nn.Module, tok: Any, rows: list[dict[str, Any]], mats: dict[str, np.ndarray],
                       names: list[str], dim: int, index: list[int], channels: list[str], max_new_tokens: int,
                       batch_size: int, *, sampling: Sampling = GREEDY, fixed_shape: bool = False,
                       runtime: Any = None) -> list[dict[str, Any]]:
    """Records (arm `x:<X>:a|b`, capability Y) for every X != Y among `channels` that has two states."""
    model.eval()
    records = []
    for x in channels:
        states = channel_states(rows, index, x)
        if states is None:
            continue
        col = names.index(x)
        targets = [i for i in index if rows[i]["capability"] in channels and rows[i]["capability"] != x
                   and rows[i]["kind"] != "conflict"]
        if not targets:
            continue
        real = channel_tensor(mats, names, dim, targets)
        ids = [tok.prompt_ids(rows[i]["prompt"]) for i in targets]
        for label, source in zip("ab", states, strict=True):
            chans = real.clone()
            chans[:, col] = channel_tensor(mats, names, dim, [source])[0, col]
            outs = generate(model, ids, chans, max_new_tokens, tok.eos_id, tok.pad_id, batch_size=batch_size,
                            sampling=sampling, fixed_shape=fixed_shape, runtime=runtime)
            arm = crosstalk_arm(x, label)
            for i, p, new in zip(targets, ids, outs, strict=True):
                records.append({**_record(rows[i], arm, 0, rows[i]["prompt"], tok.decode(new), len(p), len(new)),
                                "channel": f"{x}={label}"})
    return records
