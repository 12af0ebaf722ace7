"""vocab_conv: causal depthwise convolution + Fourier register ops, a vocabulary-space model (after exp-agi-models v2).

Each of `hops` rounds does, on the [B,T,V] word-activation state x (both steps pre-normed, residual,
each scaled per word):
  1. conv (cross-position): every word's activation is filtered over its own last `kernel`
     positions (left-padded, so position t never sees t+1); no mixing between words;
  2. Fourier register op (within-position): read `op_width` soft word groups, mix them, write back:
     read = softmax over words of (B Cr^T), h = gelu(x read M + b), x += out * h (B Cw^T)^T, where B
     [V, 2 fourier_basis] is a fixed cos/sin basis over word ids and Cr, Cw, M are learned.

Parameters per hop: conv V k + V (bias) + per-word scales 2 V + read/write coefficients
2 op_width 2 fourier_basis + mix op_width^2 + bias op_width + 1 out scale; plus one logit scale.
At V=1024, 8 hops, k=16, 16 basis pairs, width 128: 353,289 (the reference's defaults).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from models.gpt import Window, rms_norm
from models.vocab_common import VocabLM, vocab_builder

DEFAULTS = {"hops": 8, "kernel": 16, "fourier_basis": 16, "op_width": 128, "softcap": 30.0}


def word_id_basis(vocab_size: int, n: int) -> Tensor:
    """[V, 2n]: cos and sin of frequencies 1..n over word ids scaled to [0, 1) (columns cos1, sin1, cos2, ...)."""
    ids = torch.arange(vocab_size, dtype=torch.float32) / vocab_size
    angles = 2 * math.pi * ids[:, None] * torch.arange(1, n + 1, dtype=torch.float32)
    return torch.stack([angles.cos(), angles.sin()], dim=-1).flatten(1)


class CausalDepthwiseConv(nn.Module):
    """One filter per word over the last `kernel` positions (zero before the sequence start)."""

    def __init__(self, vocab_size: int, kernel: int):
        super().__init__()
        self.kernel = kernel
        self.weight = nn.Parameter(torch.randn(vocab_size, 1, kernel) * 0.02)
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, x: Tensor, keep: Tensor | None, positions: Tensor | None = None) -> Tensor:
        if positions is not None:
            return self._within_rows(x if keep is None else x * keep, positions)
        src = (x if keep is None else x * keep).transpose(1, 2)  # [B,V,T]
        y = F.conv1d(F.pad(src, (self.kernel - 1, 0)), self.weight.to(x.dtype), self.bias.to(x.dtype),
                     groups=src.size(1))
        return y.transpose(1, 2)

    def _within_rows(self, src: Tensor, positions: Tensor) -> Tensor:
        """The same conv over packed windows, restarted at every row: tap i reads `back` = k-1-i positions
        earlier and counts only where the position inside the row is >= back, as if zeros preceded each
        row. One tap at a time, so only views of the padded input and [B,T,1] masks are kept for backward."""
        T, k, w = src.size(1), self.kernel, self.weight.to(src.dtype)[:, 0, :]  # [V, k]
        padded = F.pad(src, (0, 0, k - 1, 0))  # [B, T + k - 1, V]
        y = self.bias.to(src.dtype)
        for i in range(k):
            back = k - 1 - i
            term = padded[:, i:i + T] * w[:, i]
            y = y + (term if back == 0 else term * (positions >= back)[..., None].to(src.dtype))
        return y


class FourierRegisterOp(nn.Module):
    """Read soft word groups, mix them, write back to words; groups are smooth in word-id order."""

    def __init__(self, n_basis: int, width: int):
        super().__init__()
        self.read = nn.Parameter(torch.randn(width, 2 * n_basis) * 0.02)
        self.write = nn.Parameter(torch.randn(width, 2 * n_basis) * 0.02)
        self.mix = nn.Parameter(torch.randn(width, width) * 0.02)
        self.bias = nn.Parameter(torch.zeros(width))
        self.out = nn.Parameter(torch.tensor(0.1))

    def forward(self, x: Tensor, basis: Tensor) -> Tensor:
        d = x.dtype
        reads = torch.softmax(basis @ self.read.T, dim=0).to(d)  # [V, width], each group a distribution over words
        h = F.gelu((x @ reads) @ self.mix.to(d) + self.bias.to(d))
        return h @ (basis @ self.write.T).to(d).T * self.out.to(d)


class ConvHop(nn.Module):
    def __init__(self, vocab_size: int, kernel: int, n_basis: int, width: int):
        super().__init__()
        self.conv = CausalDepthwiseConv(vocab_size, kernel)
        self.op = FourierRegisterOp(n_basis, width)
        self.conv_scale = nn.Parameter(torch.ones(vocab_size))
        self.op_scale = nn.Parameter(torch.ones(vocab_size))

    def forward(self, x: Tensor, keep: Tensor | None, basis: Tensor, positions: Tensor | None = None) -> Tensor:
        x = x + self.conv_scale.to(x.dtype) * self.conv(rms_norm(x), keep, positions)
        return x + self.op_scale.to(x.dtype) * self.op(rms_norm(x), basis)

    def macs_per_token(self, seq_len: int) -> float:
        V, width = self.conv.weight.size(0), self.op.mix.size(0)
        return V * self.conv.kernel + 2 * V * width + width * width  # conv taps; read and write; mix


class VocabConv(VocabLM):
    def __init__(self, vocab_size: int, seq_len: int, hops: int = 8, kernel: int = 16, fourier_basis: int = 16,
                 op_width: int = 128, softcap: float = 30.0):
        super().__init__(vocab_size, seq_len, softcap)
        self.rounds_list = nn.ModuleList(ConvHop(vocab_size, kernel, fourier_basis, op_width) for _ in range(hops))
        self.register_buffer("basis", word_id_basis(vocab_size, fourier_basis), persistent=False)

    def rounds(self, x: Tensor, keep: Tensor | None, window: Window | None = None) -> Tensor:
        positions = None if window is None else window.positions
        for hop in self.rounds_list:
            x = hop(x, keep, self.basis, positions)
        return x


build_vocab_conv = vocab_builder("vocab_conv", VocabConv, DEFAULTS)
