"""What every vocabulary-space model shares: one-hot in, softcapped state out, the trainer's interface.

In a vocabulary-space model the hidden size IS the vocabulary size: a token enters as its one-hot
vector, every layer keeps a [B,T,V] state that reads as "how active is each word here", and the
final state (rms-normed, scaled, softcapped) is the logits: no embedding, no output projection.
A subclass supplies only its rounds (`rounds(x, keep)`); this base gives it the forward / loss /
generation / introspection methods the trainer, `generate` and `load_model` expect of every model.

Channels are accepted and ignored, as the channel-less baseline does: these models have no
pathway for them, and a shared profile (or the eval's ABLATED arm) may still pass them.

`keep` ([B,T,1], 1 = a real token) exists for left-padded generation: a round must multiply its
cross-position *sources* by it, so padding is never read and a padded row equals the row alone.
`window` (packed training windows, models.gpt.Window: row_ids, positions [B,T]) likewise: a round's
cross-position step must read only earlier positions of the same row (graph: the [T,T] propagation
weights are cut to same-row pairs; conv: a tap j steps back counts only at positions >= j of a row),
so a row in a window computes what it computes alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from models.config import check_keys
from models.gpt import Window, masked_cross_entropy, rms_norm, target_cross_entropy
from tinymars.domain import VOCAB_ARCH_KEYS


def softcap(logits: Tensor, cap: float) -> Tensor:
    """cap * tanh(logits / cap): bounded logits, so an rms-normed V-wide state cannot blow up the loss."""
    return cap * torch.tanh(logits / cap)


def one_hot_state(idx: Tensor, vocab_size: int, dtype: torch.dtype) -> Tensor:
    """Tokens [B,T] -> the initial rms-normed one-hot state [B,T,V] (sqrt(V) at the token, 0 elsewhere)."""
    return rms_norm(F.one_hot(idx, vocab_size).to(dtype))


class VocabLM(nn.Module):
    """Base of the vocabulary-space models; subclasses set `self.rounds_list` and implement `round_flops`."""

    packs_rows = True  # forward takes a packed `window` and return_logits=False: the trainer packs its data

    def __init__(self, vocab_size: int, seq_len: int, softcap: float):
        super().__init__()
        self.vocab_size, self.seq_len, self.cap = vocab_size, seq_len, float(softcap)
        self.logit_scale = nn.Parameter(torch.tensor(1.0))

    def rounds(self, x: Tensor, keep: Tensor | None, window: Window | None = None) -> Tensor:
        raise NotImplementedError

    def forward(self, idx: Tensor, channels: Tensor | None = None, targets: Tensor | None = None,
                loss_mask: Tensor | None = None, valid: Tensor | None = None, *, window: Window | None = None,
                return_logits: bool = True) -> tuple[Tensor | None, Tensor | None]:
        """Logits [B,T,V] float32 and, given targets, the mean CE over loss_mask == 1 (channels are ignored).

        Packed windows: `window` (Window.of(batch)); `return_logits=False` returns (None, loss) with the
        softcapped head run only at target positions (as models.gpt.ChannelDecoder.forward).
        """
        dtype = self.logit_scale.dtype
        if torch.is_autocast_enabled(idx.device.type):
            dtype = torch.get_autocast_dtype(idx.device.type)
        keep = None if valid is None else valid[..., None].to(dtype)
        x = one_hot_state(idx, self.vocab_size, dtype)
        if keep is not None:
            x = x * keep
        x = self.rounds(x, keep, window)
        if not return_logits:
            return None, None if targets is None else target_cross_entropy(x, self._head, targets, loss_mask)
        logits = self._head(x).float()
        return logits, None if targets is None else masked_cross_entropy(logits, targets, loss_mask)

    def _head(self, x: Tensor) -> Tensor:
        return softcap(rms_norm(x) * self.logit_scale.to(x.dtype), self.cap)

    # ---- generation: no per-position state worth caching, so the "cache" keeps token ids -----------
    def new_cache(self, batch: int, max_len: int, fixed: bool = False) -> TokenCache:
        return TokenCache(batch, max_len, self.logit_scale.device, fixed)

    def decode(self, idx: Tensor, cache: TokenCache, channels: Tensor | None = None,
               valid: Tensor | None = None) -> Tensor:
        """Append idx [B,t] (valid: False = left padding) and return their logits [B,t,V] by recomputing.

        Fixed mode runs the whole buffer every call (one shape); slots not yet written are invalid and,
        the models being causal, cannot reach earlier positions anyway.
        """
        t = idx.size(1)
        valid = torch.ones_like(idx, dtype=torch.bool) if valid is None else valid
        if cache.fixed:
            at = cache.cursor + torch.arange(t, device=idx.device)
            cache.idx.index_copy_(1, at, idx)
            cache.valid.index_copy_(1, at, valid)
            logits, _ = self(cache.idx, valid=cache.valid)
            cache.cursor += t
            return logits.index_select(1, at)
        start, end = cache.length, cache.length + t
        cache.idx[:, start:end] = idx
        cache.valid[:, start:end] = valid
        cache.length = end
        logits, _ = self(cache.idx[:, :end], valid=cache.valid[:, :end])
        return logits[:, start:]

    # ---- introspection (the same calls the trainer makes on the channel models) -------------------------
    def gate_values(self) -> Tensor:
        """No channel gates: [n_rounds, 0]."""
        return torch.zeros(len(self.rounds_list), 0)

    def alpha_l2(self) -> float:
        return 0.0

    def flops_per_token(self) -> float:
        """Training FLOPs per token: 3 x (forward multiply-adds x 2) summed over the rounds."""
        return 6.0 * sum(r.macs_per_token(self.seq_len) for r in self.rounds_list)


class TokenCache:
    """Token ids and their real-token mask, preallocated [B, max_len]; `cursor` is a tensor in fixed mode."""

    def __init__(self, batch: int, max_len: int, device: torch.device, fixed: bool):
        self.idx = torch.zeros(batch, max_len, dtype=torch.long, device=device)
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.length = 0
        self.fixed = fixed
        self.cursor = torch.zeros((), dtype=torch.long, device=device)


def vocab_builder(name: str, cls: type[VocabLM], defaults: dict[str, Any]) -> Callable[..., VocabLM]:
    """The builder of arch `name` (models.architectures adds it); its spec keys are the profile's
    (tinymars.domain.VOCAB_ARCH_KEYS), each with a default here; typos are refused.

    Channel fields are accepted (shared profiles) and ignored, as the baseline's builder does.
    """
    keys = frozenset(defaults)
    if keys != set(VOCAB_ARCH_KEYS[name]):
        raise ValueError(f"{name}: defaults {sorted(keys)} differ from tinymars.domain.VOCAB_ARCH_KEYS "
                         f"{sorted(VOCAB_ARCH_KEYS[name])}")

    def build_vocab_model(spec: dict[str, Any], *, vocab_size: int, seq_len: int, channel_names: Sequence[str] = (),
                          channel_dim: int = 0) -> VocabLM:
        check_keys(spec, keys, ())
        return cls(vocab_size, seq_len, **{**defaults, **{k: spec[k] for k in keys if k in spec}})

    return build_vocab_model
