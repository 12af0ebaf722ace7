"""Batched greedy decoding with a KV cache.

Prompts of different lengths are left-padded; the cache's padding mask and per-row RoPE
positions make every row decode exactly as it would alone (tested against full recomputation).
Prompts are sorted by length before batching so rows of similar length share a batch.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


@torch.no_grad()
def generate(model: nn.Module, prompts: list[list[int]], channels: Tensor | None, max_new_tokens: int,
             eos_id: int, pad_id: int, batch_size: int = 32) -> list[list[int]]:
    """Greedy continuations (new tokens only, eos excluded), in the order of `prompts`.

    `channels` is [N, C, D] aligned with prompts, or None (zeros: the ablated state).
    """
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (e.g. bos)")
    if channels is not None and len(channels) != len(prompts):
        raise ValueError(f"{len(channels)} channel rows for {len(prompts)} prompts")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        ch = channels[rows].to(device) if channels is not None else None
        new = _generate_batch(model, [prompts[i] for i in rows], ch, max_new_tokens, eos_id, pad_id, device)
        for i, tokens in zip(rows, new, strict=True):
            out[i] = tokens
    model.train(was_training)
    return out


def _generate_batch(model: nn.Module, prompts: list[list[int]], channels: Tensor | None, max_new_tokens: int,
                    eos_id: int, pad_id: int, device: torch.device) -> list[list[int]]:
    B, L = len(prompts), max(len(p) for p in prompts)
    if max_new_tokens <= 0:
        return [[] for _ in prompts]
    idx = torch.full((B, L), pad_id, dtype=torch.long)
    valid = torch.zeros(B, L, dtype=torch.bool)
    for b, p in enumerate(prompts):
        idx[b, L - len(p):] = torch.tensor(p, dtype=torch.long)
        valid[b, L - len(p):] = True
    cache = model.new_cache(B, L + max_new_tokens)
    logits = model.decode(idx.to(device), cache, channels, valid.to(device))[:, -1]
    done = torch.zeros(B, dtype=torch.bool, device=device)
    steps: list[Tensor] = []
    for t in range(max_new_tokens):
        nxt = logits.argmax(dim=-1)
        steps.append(nxt)
        done |= nxt == eos_id
        if t == max_new_tokens - 1 or bool(done.all()):
            break
        logits = model.decode(nxt[:, None], cache)[:, -1]  # finished rows keep going; cut below
    result = []
    for row in torch.stack(steps, dim=1).tolist():
        result.append(row[: row.index(eos_id)] if eos_id in row else row)
    return result
