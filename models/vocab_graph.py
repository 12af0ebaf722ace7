"""vocab_graph: the low-rank word graph, a vocabulary-space model (after exp-agi-models v8, rank 8).

Each of `hops` rounds does, on the [B,T,V] word-activation state x (both steps pre-normed, residual):
  1. propagation (cross-position): score[t,s] = (x_t * q) . (x_s * k) for s < t only, weighted by
     decay^(t-s-1), and x_t += out * sum_s score[t,s] x_s  -- earlier positions with similar word
     activations pass their words forward, fading with distance;
  2. interaction (within-position): x += out * gelu(x U V^T + x * diag + bias) -- "word i activates
     word j" through a rank-r graph W = U V^T plus a per-word self term.
Rank is the capacity knob: the reference generalised at rank 8 and memorised a bigram table at 64.

Parameters per hop: U, V (2 V r) + diag, bias, q, k (4 V) + 5 scalars (decay, two out-scales, two
residual scales); plus one logit scale. At V=1024, r=8, 8 hops: 163,881.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from models.gpt import Window, rms_norm
from models.vocab_common import VocabLM, vocab_builder

DEFAULTS = {"rank": 8, "hops": 8, "softcap": 30.0}


def past_decay(decay: Tensor, T: int) -> Tensor:
    """[T,T] weights decay^(t-s-1) for s < t and exactly 0 for s >= t (a position never reads itself or later)."""
    pos = torch.arange(T, device=decay.device)
    gap = pos[:, None] - pos[None, :]
    return torch.where(gap > 0, decay ** (gap - 1).clamp_min(0).to(decay.dtype), torch.zeros((), device=decay.device))


class WordPropagation(nn.Module):
    """Decayed causal linear attention in word space with diagonal (per-word) query/key scales."""

    def __init__(self, vocab_size: int, decay_logit: float = 3.0):
        super().__init__()
        self.q = nn.Parameter(torch.ones(vocab_size))
        self.k = nn.Parameter(torch.ones(vocab_size))
        self.decay_logit = nn.Parameter(torch.tensor(decay_logit))
        self.out = nn.Parameter(torch.tensor(0.1))

    def forward(self, x: Tensor, keep: Tensor | None, same_row: Tensor | None = None) -> Tensor:
        """same_row [B,T,T] (packed windows): only pairs within one row propagate."""
        src = x if keep is None else x * keep
        scores = (x * self.q.to(x.dtype)) @ (src * self.k.to(x.dtype)).transpose(1, 2)  # [B,T,T]
        weights = past_decay(torch.sigmoid(self.decay_logit), x.size(1)).to(x.dtype)
        if same_row is not None:
            weights = weights * same_row.to(x.dtype)
        return (scores * weights) @ src * self.out.to(x.dtype)


class WordInteraction(nn.Module):
    """x -> gelu(x U V^T + x * diag + bias) * out: a rank-r (plus diagonal) V x V map, never materialised."""

    def __init__(self, vocab_size: int, rank: int):
        super().__init__()
        self.U = nn.Parameter(torch.randn(vocab_size, rank) * 0.02)
        self.V = nn.Parameter(torch.randn(vocab_size, rank) * 0.02)
        self.diag = nn.Parameter(torch.zeros(vocab_size))
        self.bias = nn.Parameter(torch.zeros(vocab_size))
        self.out = nn.Parameter(torch.tensor(0.1))

    def forward(self, x: Tensor) -> Tensor:
        d = x.dtype
        h = (x @ self.U.to(d)) @ self.V.to(d).T + x * self.diag.to(d) + self.bias.to(d)
        return F.gelu(h) * self.out.to(d)


class GraphHop(nn.Module):
    def __init__(self, vocab_size: int, rank: int):
        super().__init__()
        self.propagate = WordPropagation(vocab_size)
        self.interact = WordInteraction(vocab_size, rank)
        self.propagate_scale = nn.Parameter(torch.ones(1))
        self.interact_scale = nn.Parameter(torch.ones(1))

    def forward(self, x: Tensor, keep: Tensor | None, same_row: Tensor | None = None) -> Tensor:
        x = x + self.propagate_scale.to(x.dtype) * self.propagate(rms_norm(x), keep, same_row)
        return x + self.interact_scale.to(x.dtype) * self.interact(rms_norm(x))

    def macs_per_token(self, seq_len: int) -> float:
        V, r = self.interact.U.shape
        return 2 * V * r + 2 * seq_len * V  # U and V^T; scores and the weighted sum over T positions


class VocabGraph(VocabLM):
    def __init__(self, vocab_size: int, seq_len: int, rank: int = 8, hops: int = 8, softcap: float = 30.0):
        super().__init__(vocab_size, seq_len, softcap)
        self.rounds_list = nn.ModuleList(GraphHop(vocab_size, rank) for _ in range(hops))

    def rounds(self, x: Tensor, keep: Tensor | None, window: Window | None = None) -> Tensor:
        same_row = None if window is None else window.row_ids[:, :, None] == window.row_ids[:, None, :]
        for hop in self.rounds_list:
            x = hop(x, keep, same_row)
        return x


build_vocab_graph = vocab_builder("vocab_graph", VocabGraph, DEFAULTS)
