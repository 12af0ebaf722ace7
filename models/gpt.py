"""ChannelDecoder: a small pre-norm GPT that reads proprioceptive channels in every layer.

Shape glossary: B batch, T time, H heads, E head dim, C channels, D channel width,
K tokens per channel, M model width (d_model), V vocab.

Notable choices
- Untied lm_head: the input embedding wants unit scale (it *is* the pre-norm residual stream)
  while the head wants a near-zero init so the first loss is ln V; tying forces one compromise
  scale. It costs V*M parameters, which the baselines pay too, so comparisons stay fair.
- ReLU^2 MLP and QK-norm, as in nanochat: cheap, and stable at the high LRs a 2-minute CPU run needs.
- Channels are all handled by einsums over a channel axis with static shapes (no per-channel
  Python loop), because data-dependent shapes made the XLA/TPU run 12x slower in the reference.
  The encoder is sized per channel (a 2-d channel owns 2*K*M weights, not D*K*M; no weight only
  ever multiplies padding): one einsum per distinct channel width, static slices of one weight.
- The encoder and injections have no biases, so a zeroed channel contributes exactly nothing:
  "ABLATED" means the text-only path, whatever the gates learned.
- Packed windows (models.data, `window=Window(...)`): attention is block-diagonal causal (SDPA with
  an explicit mask: a position reads only earlier positions of its own row), RoPE positions restart
  at every row, and each position's channel injection reads its own row's channel tokens
  (channels [B,R,C,D], one slot per row). So a row in a window computes what it computes alone,
  and nothing of one row reaches another. Without a window: one row per sequence.
- Training asks for the loss only (`return_logits=False`): the head then runs only at positions whose
  loss_mask is set (targets are ~half of a packed window and ~2% of a padded one), in the autocast
  dtype (bf16 on accelerators), with the cross-entropy in fp32.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from models.config import ModelConfig


def rms_norm(x: Tensor) -> Tensor:
    """Parameter-free RMSNorm (nanochat style): one less thing to decay or tie."""
    return F.rms_norm(x, (x.size(-1),))


def masked_cross_entropy(logits: Tensor, targets: Tensor, loss_mask: Tensor | None) -> Tensor:
    """Mean next-token CE over positions where loss_mask == 1 (all positions without a mask)."""
    ce = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none")
    if loss_mask is None:
        return ce.mean()
    m = loss_mask.flatten().to(ce.dtype)
    return (ce * m).sum() / m.sum().clamp_min(1.0)


HEAD_CHUNK_LOGITS = 1 << 26  # logits per chunk of the target-only head (64M: 256 MB in fp32)


@torch.compiler.disable  # the number of target positions changes every batch: kept out of compiled graphs
def target_cross_entropy(hidden: Tensor, head: Callable[[Tensor], Tensor], targets: Tensor,
                         loss_mask: Tensor | None) -> Tensor:
    """Mean next-token CE over loss_mask == 1 positions, the head applied at those positions only.

    hidden [B,T,W] -> head -> logits [n, V] in the head's dtype (bf16 under autocast), CE in fp32,
    in chunks of HEAD_CHUNK_LOGITS logits (without gradients that bounds the memory; with them the
    chunks' fp32 log-probabilities are kept for backward either way). On XLA the head runs at every
    position instead, so the graph keeps one shape (a selection's size would change it every batch).
    """
    if loss_mask is None or hidden.device.type == "xla":
        return masked_cross_entropy(head(hidden), targets, loss_mask)
    keep = loss_mask.flatten() > 0
    h, t = hidden.flatten(0, 1)[keep], targets.flatten()[keep]
    vocab = getattr(head, "out_features", None) or hidden.size(-1)  # an nn.Linear head, or a same-width one
    step = max(1, HEAD_CHUNK_LOGITS // vocab)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, max(1, h.size(0)), step):  # once even with no target: the head stays in the graph
        logits = head(h[start:start + step])
        total = total + F.cross_entropy(logits.float(), t[start:start + step], reduction="sum")
    return total / max(1, h.size(0))


def same_row_causal_mask(row_ids: Tensor) -> Tensor:
    """[B,1,T,T] bool for SDPA: position t reads s iff s <= t and both belong to the same row.

    The tail padding of a window (row id -1) is one more "row" of its own; every position reads at
    least itself, so no softmax row is empty.
    """
    T = row_ids.size(1)
    causal = torch.ones(T, T, dtype=torch.bool, device=row_ids.device).tril()
    return ((row_ids[:, :, None] == row_ids[:, None, :]) & causal)[:, None]


class Window(NamedTuple):
    """The layout of a batch of packed windows [B,T] (models.data.make_window_batch builds the tensors)."""

    row_ids: Tensor  # [B,T] slot of the row a position belongs to; -1 on the tail padding
    positions: Tensor  # [B,T] position inside its row: RoPE restarts at 0 at every row
    row_tiles: Tensor  # [B,nT,Rb] the row slots each tile of ceil(T/nT) positions touches; -1: none

    @classmethod
    def of(cls, batch: dict[str, Tensor]) -> Window | None:
        """The window layout of a batch dict, or None for one row per sequence."""
        return cls(batch["row_ids"], batch["positions"], batch["row_tiles"]) if "row_ids" in batch else None


def gather_rows(per_row: Tensor, slots: Tensor) -> Tensor:
    """per_row [B,R,...], slots [B,n] -> [B,n,...]: entry slots[b,i] of window b (a slot of -1 reads slot 0)."""
    B, R = per_row.shape[:2]
    flat = slots.clamp(0, R - 1) + R * torch.arange(B, device=slots.device)[:, None]
    return per_row.flatten(0, 1).index_select(0, flat.flatten()).view(*slots.shape, *per_row.shape[2:])


def _inverse(order: Sequence[int]) -> list[int]:
    """The permutation that undoes `order` (position i of the result is where i went)."""
    return sorted(range(len(order)), key=lambda i: order[i])


def rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the two halves of each head by position-dependent angles. x: [B,T,H,E]."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class KVCache:
    """Preallocated keys/values for batched greedy decoding of left-padded prompts.

    `valid[b, s]` says slot s of row b holds a real token (not left padding); `n_real[b]` is the
    number of real tokens seen, i.e. the RoPE position of the row's next token. Encoded channel
    tokens are kept here so the channel encoder runs once per prompt, not once per token.

    `fixed=True` (for XLA / torch.compile): writes go to a tensor cursor and attention always spans
    the whole preallocated buffer (unwritten slots are masked out), so every decode step has the
    same shapes and no Python int that changes per step: one graph for the prefill, one per step.
    """

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device: torch.device, dtype: torch.dtype,
                 fixed: bool = False):
        shape = (cfg.n_layer, batch, cfg.n_head, max_len, cfg.d_model // cfg.n_head)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.n_real = torch.zeros(batch, dtype=torch.long, device=device)
        self.length = 0
        self.channel_tokens: Tensor | None = None
        self.fixed = fixed
        self.cursor = torch.zeros((), dtype=torch.long, device=device)  # next free slot (fixed mode)

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write this step's keys/values ([B,H,t,E]) and return everything so far (fixed: the whole buffer)."""
        if self.fixed:
            at = self.cursor + torch.arange(k.size(2), device=k.device)
            self.k[layer].index_copy_(2, at, k)
            self.v[layer].index_copy_(2, at, v)
            return self.k[layer], self.v[layer]
        end = self.length + k.size(2)
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class SelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.head_dim, self.dropout = cfg.n_head, cfg.d_model // cfg.n_head, cfg.dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | None = None,
                layer: int = 0, mask: Tensor | None = None) -> Tensor:
        B, T, M = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, self.head_dim).unbind(2)
        # under bf16 autocast rope/rms_norm run in fp32 while v stays bf16; SDPA wants one dtype
        q, k = rms_norm(rope(q, cos, sin)).to(v.dtype), rms_norm(rope(k, cos, sin)).to(v.dtype)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B,H,T,E]
        if cache is None:  # training / scoring: causal, or (packed windows) causal within each row
            p = self.dropout if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, dropout_p=p)
        else:
            k, v = cache.update(layer, k, v)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return F.dropout(self.proj(y.transpose(1, 2).reshape(B, T, M)), self.dropout, self.training)


class ChannelEncoder(nn.Module):
    """Project each channel's own D_c numbers to K tokens of width M; weights for real inputs only.

    Channel vectors arrive zero-padded to the widest channel's D ([B,C,D], the pack format); channel c
    reads its first D_c entries (`channel_dims`; left out, every channel is D wide). The one weight is
    packed, [sum D_c, K, M], each channel owning D_c consecutive rows (grouped by width): a [C,D,K,M] weight would
    give a 2-d affect channel D*K*M weights of which all but 2*K*M only ever multiply padding (they get
    no gradient, never learn, yet were counted: 7.8M of iter7's native). Channels of one width share
    one einsum; the loop over widths has static slices, so every shape stays static (one XLA graph).
    Sized by plain numbers (not a ModelConfig) so the frozen-base adapter reuses it at the base's width.
    """

    def __init__(self, n_channels: int, channel_dim: int, channel_tokens: int, width: int,
                 channel_dims: Sequence[int] | None = None):
        super().__init__()
        dims = tuple(channel_dims) if channel_dims else (channel_dim,) * n_channels
        if len(dims) != n_channels or not all(1 <= d <= channel_dim for d in dims):
            raise ValueError(f"channel_dims {list(dims)}: give one width in 1..{channel_dim} per channel "
                             f"({n_channels} channels)")
        self.channel_dim, self.channel_dims, self.channel_tokens, self.width = channel_dim, dims, channel_tokens, width
        # one group per distinct width: (width, its channels, its rows of the packed weight). Rows go group
        # after group, so a group's weight is a slice; its channels are a slice too when they are adjacent.
        self.groups: list[tuple[int, slice | list[int], slice]] = []
        order, row = [], 0
        for w in dict.fromkeys(dims):
            chans = [c for c, d in enumerate(dims) if d == w]
            adjacent = chans == list(range(chans[0], chans[-1] + 1))
            self.groups.append((w, slice(chans[0], chans[-1] + 1) if adjacent else chans,
                                slice(row, row + len(chans) * w)))
            order, row = order + chans, row + len(chans) * w
        self.unpermute = None if order == sorted(order) else _inverse(order)  # groups' order -> channel order
        self.weight = nn.Parameter(torch.empty(sum(dims), channel_tokens, width))

    def forward(self, channels: Tensor) -> Tensor:
        """channels [B,C,D] (zero-padded) -> tokens [B,C,K,M]."""
        if tuple(channels.shape[1:]) != (len(self.channel_dims), self.channel_dim):
            raise ValueError(f"channels [B,C,D] = {list(channels.shape)}: this encoder takes C = "
                             f"{len(self.channel_dims)} channels zero-padded to D = {self.channel_dim}")
        parts = [torch.einsum("bcd,cdkm->bckm", channels[:, chans, :w],
                              self.weight[rows].view(-1, w, self.channel_tokens, self.width))
                 for w, chans, rows in self.groups]
        tokens = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        return tokens if self.unpermute is None else tokens[:, self.unpermute]


class ChannelInjection(nn.Module):
    """Cross-attention from hidden states to each channel's K tokens, gated per channel (ReZero).

    Softmax runs over one channel's K tokens, for all channels at once ([B,H,T,C,K]), so a
    channel competes only with itself and its gate alone decides how much it is heard.
    """

    def __init__(self, width: int, n_head: int, n_channels: int, dropout: float = 0.0):
        super().__init__()
        if width % n_head:
            raise ValueError(f"channel injection width {width} is not divisible by n_head {n_head}")
        self.n_head, self.head_dim, self.dropout = n_head, width // n_head, dropout
        self.q = nn.Linear(width, width, bias=False)
        self.kv = nn.Linear(width, 2 * width, bias=False)
        self.proj = nn.Linear(width, width, bias=False)
        self.gate = nn.Parameter(torch.zeros(n_channels))

    def forward(self, x: Tensor, tokens: Tensor, window: Window | None = None) -> Tensor:
        """tokens [B,C,K,M] (one row per sequence), or [B,R,C,K,M] with a packed `window` (each position
        reads its own row's tokens)."""
        if window is not None:
            return self._per_row(x, tokens, window)
        B, T, M = x.shape
        _, C, K, _ = tokens.shape
        q = self.q(x).view(B, T, self.n_head, self.head_dim)
        k, v = self.kv(tokens).view(B, C, K, 2, self.n_head, self.head_dim).unbind(3)
        att = torch.einsum("bthe,bckhe->bhtck", q, k) * self.head_dim**-0.5
        att = F.dropout(att.softmax(dim=-1), self.dropout, self.training)
        # Scaling v by the gate == scaling each channel's output; the sum over c happens in the einsum.
        v = v * self.gate.view(1, C, 1, 1, 1)
        y = torch.einsum("bhtck,bckhe->bthe", att, v).reshape(B, T, M)
        return F.dropout(self.proj(y), self.dropout, self.training)

    def _per_row(self, x: Tensor, tokens: Tensor, window: Window) -> Tensor:
        """The same attention with each position's keys and values taken from its own row, tile by tile.

        Keys/values are projected and gated once per row slot. A tile of S positions touches at most Rb
        consecutive rows (window.row_tiles, a bound the loader derives from the shortest row), so it
        reads those Rb rows' C*K tokens only: scores [S, Rb*C*K] per tile and head, softmax over each
        channel's K tokens, then every weight of another row than the position's own is zeroed. Per
        position that is Rb*C*K scores per head, instead of a copy of its row's C*K*2M keys/values.
        """
        B, T, M = x.shape
        _, R, C, K, _ = tokens.shape
        H, E, tiles = self.n_head, self.head_dim, window.row_tiles
        nT, Rb = tiles.shape[1:]
        S = -(-T // nT)
        kv = self.kv(tokens).view(B, R, C, K, 2, H, E)
        k, v = kv[..., 0, :, :], kv[..., 1, :, :] * self.gate.view(1, 1, C, 1, 1, 1)
        rows_kv = torch.stack([k, v], 2).flatten(3, 4)  # [B,R,2,C*K,H,E]
        k, v = gather_rows(rows_kv, tiles.flatten(1)).view(B, nT, Rb, 2, C * K, H, E).unbind(3)
        k = k.permute(0, 1, 4, 5, 2, 3).reshape(B, nT, H, E, Rb * C * K)
        v = v.permute(0, 1, 4, 2, 3, 5).reshape(B, nT, H, Rb * C * K, E)
        q = F.pad(self.q(x), (0, 0, 0, nT * S - T)).view(B, nT, S, H, E).transpose(2, 3)  # [B,nT,H,S,E]
        att = ((q @ k) * E**-0.5).view(B, nT, H, S, Rb, C, K).softmax(dim=-1)
        rows = F.pad(window.row_ids, (0, nT * S - T), value=-1).view(B, nT, S, 1)
        own = (rows == tiles[:, :, None, :]) & (rows >= 0)  # [B,nT,S,Rb]: the position's own row
        att = att * own[:, :, None, :, :, None, None].to(att.dtype)
        att = F.dropout(att, self.dropout, self.training).view(B, nT, H, S, Rb * C * K)
        y = (att @ v).transpose(2, 3).reshape(B, nT * S, M)[:, :T]
        return F.dropout(self.proj(y), self.dropout, self.training)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = int(cfg.mlp_ratio * cfg.d_model)
        self.fc = nn.Linear(cfg.d_model, hidden, bias=False)
        self.proj = nn.Linear(hidden, cfg.d_model, bias=False)
        self.dropout = cfg.dropout

    def forward(self, x: Tensor) -> Tensor:
        return F.dropout(self.proj(F.relu(self.fc(x)).square()), self.dropout, self.training)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn = SelfAttention(cfg)
        self.inject = (ChannelInjection(cfg.d_model, cfg.n_head, cfg.n_channels, cfg.dropout)
                       if cfg.has_channels else None)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, tokens: Tensor | None,
                cache: KVCache | None = None, layer: int = 0, mask: Tensor | None = None,
                window: Window | None = None) -> Tensor:
        x = x + self.attn(rms_norm(x), cos, sin, cache, layer, mask)
        if self.inject is not None:
            x = x + self.inject(rms_norm(x), tokens, window)
        return x + self.mlp(rms_norm(x))


class ChannelDecoder(nn.Module):
    """Decoder-only LM; with `cfg.channel_names` empty it is the channel-less baseline."""

    packs_rows = True  # forward takes a packed `window` and return_logits=False: the trainer packs its data

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        head_dim = cfg.d_model // cfg.n_head
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.encoder = (ChannelEncoder(cfg.n_channels, cfg.channel_dim, cfg.channel_tokens, cfg.d_model,
                                       cfg.channel_dims or None) if cfg.has_channels else None)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        index = cfg.channel_index  # a channel subset: the read channels' places in the data's channel axis
        self.register_buffer("channel_index", None if index is None else torch.tensor(index, dtype=torch.long),
                             persistent=False)
        inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # derived, never saved
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """nanochat-like init: unit embeddings, 1/sqrt(fan_in) inputs, zero residual outputs.

        Exceptions, both so channels can be learned quickly from a cold start:
        - the injection's output projection is random, not zero: with the gate at 0 the gate's
          gradient is <dL/dy, proj(attn_c)>, which a zero proj would kill (a dead ReZero).
        - the channel encoder uses std 1, not 1/sqrt(D_c): channel vectors are unit-norm embeddings
          or a few numbers of order 1, so std 1 gives unit-scale tokens for a 2-d affect channel and
          a 384-d text channel alike (1/sqrt(D_c) would mute the small ones).
        """
        for name, p in self.named_parameters():
            if name.endswith("gate"):
                p.zero_()
            elif name == "wte.weight" or name == "encoder.weight":
                p.normal_(0.0, 1.0)
            elif name == "lm_head.weight":
                p.normal_(0.0, 0.001)
            elif name.endswith(("attn.proj.weight", "mlp.proj.weight")):
                p.zero_()
            else:  # every other parameter is a Linear weight [out, in]
                p.normal_(0.0, p.size(1) ** -0.5)

    # ---- channels -------------------------------------------------------------------------
    def encode_channels(self, channels: Tensor | None, batch: int) -> Tensor | None:
        """Channel tokens [B,C,K,M], or [B,R,C,K,M] for per-row channels [B,R,C,D]; None channels are
        zeros (the ablated state). A subset model is given the data's channels and keeps its own."""
        if self.encoder is None:
            return None
        if channels is None:
            channels = self.wte.weight.new_zeros(batch, self.cfg.n_channels, self.cfg.channel_dim)
        elif self.channel_index is not None:
            channels = channels.index_select(channels.dim() - 2, self.channel_index.to(channels.device))
        channels = channels.to(self.wte.weight.dtype)
        if channels.dim() == 4:  # one slot per row of a packed window
            return self.encoder(channels.flatten(0, 1)).unflatten(0, channels.shape[:2])
        return self.encoder(channels)

    def _rope(self, pos: Tensor) -> tuple[Tensor, Tensor]:
        """cos/sin [..., T, 1, E/2] for integer positions [..., T]."""
        angles = pos.to(torch.float32)[..., None] * self.inv_freq
        return angles.cos()[..., None, :], angles.sin()[..., None, :]

    # ---- training / scoring ---------------------------------------------------------------
    def forward(self, idx: Tensor, channels: Tensor | None = None, targets: Tensor | None = None,
                loss_mask: Tensor | None = None, *, window: Window | None = None,
                return_logits: bool = True) -> tuple[Tensor | None, Tensor | None]:
        """Logits [B,T,V] float32 and, given next-token targets, the mean CE over loss_mask==1 positions.

        Packed windows: `window` (Window.of(batch)) and per-row channels [B,R,C,D] (models.data).
        `return_logits=False` (training) returns (None, loss) with the head run only at target positions.
        """
        B, T = idx.shape
        if window is None:
            cos, sin, mask = *self._rope(torch.arange(T, device=idx.device)), None
        else:
            if channels is not None and channels.dim() != 4:
                raise ValueError(f"packed windows take per-row channels [B,R,C,D], got {tuple(channels.shape)}")
            cos, sin = self._rope(window.positions)
            mask = same_row_causal_mask(window.row_ids)
            if channels is None:
                channels = self.wte.weight.new_zeros(B, 1, self.cfg.n_inputs, self.cfg.channel_dim)
        tokens = self.encode_channels(channels, B)
        x = self.wte(idx)
        for block in self.blocks:
            x = block(x, cos, sin, tokens, mask=mask, window=window)
        h = rms_norm(x)
        if not return_logits:
            return None, None if targets is None else target_cross_entropy(h, self.lm_head, targets, loss_mask)
        logits = self.lm_head(h).float()
        return logits, None if targets is None else masked_cross_entropy(logits, targets, loss_mask)

    # ---- generation -----------------------------------------------------------------------
    def new_cache(self, batch: int, max_len: int, fixed: bool = False) -> KVCache:
        w = self.wte.weight
        kind = w.device.type  # under autocast keys/values come out in its dtype (bf16): store them so
        dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else w.dtype
        return KVCache(self.cfg, batch, max_len, w.device, dtype, fixed=fixed)

    def decode(self, idx: Tensor, cache: KVCache, channels: Tensor | None = None,
               valid: Tensor | None = None) -> Tensor:
        """Run new tokens idx [B,t] through the cache and return their logits [B,t,V].

        `valid` [B,t] marks real tokens (False = left padding, only in the first call). Padding
        gets no RoPE position and is never attended to, so a padded row equals the row alone.
        """
        B, t = idx.shape
        valid = torch.ones_like(idx, dtype=torch.bool) if valid is None else valid
        pos = (cache.n_real[:, None] + valid.long().cumsum(1) - 1).clamp_min(0)
        if cache.fixed:  # tensor positions over the whole buffer: the same graph at every step
            qslots = (cache.cursor + torch.arange(t, device=idx.device))[:, None]
            cache.valid.index_copy_(1, qslots[:, 0], valid)
            slots = torch.arange(cache.valid.size(1), device=idx.device)
            keys_valid = cache.valid[:, None, :]
        else:
            start, end = cache.length, cache.length + t
            cache.valid[:, start:end] = valid
            slots = torch.arange(end, device=idx.device)
            qslots = slots[start:, None]
            keys_valid = cache.valid[:, None, :end]
        cache.n_real += valid.long().sum(1)
        if cache.channel_tokens is None:
            cache.channel_tokens = self.encode_channels(channels, B)
        # causal over real keys; every query also sees itself so a pad query's softmax is finite
        mask = ((slots <= qslots) & keys_valid) | (slots == qslots)
        cos, sin = self._rope(pos)
        x = self.wte(idx)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, cache.channel_tokens, cache, i, mask[:, None])
        if cache.fixed:
            cache.cursor += t
        else:
            cache.length = end
        return self.lm_head(rms_norm(x)).float()

    # ---- introspection --------------------------------------------------------------------
    def gate_values(self) -> Tensor:
        """ReZero gates as [n_layer, C] (C = 0 for a baseline)."""
        gates = [b.inject.gate.detach() for b in self.blocks if b.inject is not None]
        return torch.stack(gates) if gates else torch.zeros(self.cfg.n_layer, 0)

    def alpha_l2(self) -> float:
        """L2 norm of all gates: the one-number proxy for 'are channels being used at all'."""
        return float(self.gate_values().float().norm())

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self) -> float:
        """Training FLOPs per token (forward + backward), for MFU; the PaLM / nanochat estimate.

        6 x the weights every token multiplies (the embedding lookup is free; the channel encoder and
        the injections' key/value projections run once per row, not per token, so they are left
        out), plus the attention scores and values: 12 * L * M * T for self-attention (not halved
        for causality, as is customary) and 12 * L * M * C * K for the channel cross-attention.
        """
        cfg = self.cfg
        per_row = ("wte.", "encoder.", ".inject.kv.", ".gate")
        per_token = sum(p.numel() for n, p in self.named_parameters() if not any(k in n for k in per_row))
        channel_tokens = cfg.n_channels * cfg.channel_tokens
        return 6.0 * per_token + 12.0 * cfg.n_layer * cfg.d_model * (cfg.seq_len + channel_tokens)

