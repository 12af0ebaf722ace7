"""Frozen-base adapter track: a pretrained causal LM, untouched, reading channels through gated adapters.

The base is a Hugging Face causal LM from a local folder (one with config.json) or one of our
own trained models (a folder with model.json, e.g. a baseline's train artifact). Its weights never
train and are kept out of the adapter's state dict (the artifact holds only adapter weights and
the base's path), so a checkpoint of a 4B base is a few hundred MB, not 10 GB.

After every base block, a forward hook adds `adapter(rms_norm(h), channel_tokens)` to the block's
output h. Two adapter kinds, both with one ReZero gate per channel initialised to 0:
- `cross_attn`: the native model's ChannelInjection (hidden states attend to each channel's K tokens);
- `film`: feature-wise modulation, h -> h + sum_c gate_c * (gamma_c * h + beta_c), gamma/beta from
  the channel's pooled tokens (the reference's iter-5 "FiLM gated bias").
With every gate at 0 each hook adds exact zeros, so the logits are bit-identical to the base's.

Parts of a multimodal base that text training never runs (vision / audio towers, projectors) are
dropped right after loading, before anything is moved to a device (the reference freed the HBM
its adapter needed this way).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from models.config import ModelConfig, check_keys
from models.gpt import ChannelDecoder, ChannelEncoder, ChannelInjection, masked_cross_entropy, rms_norm
from models.weights import META, WEIGHTS, check_sha, load_weights

ADAPTER_KEYS = frozenset({"base", "adapter", "channel_tokens", "channel_dims", "n_head", "drop"})
KINDS = ("cross_attn", "film")
# Submodules a text-only forward never uses; dropped (set to None) before the device move.
UNUSED_TOWERS = ("vision_tower", "audio_tower", "vision_model", "audio_model", "multi_modal_projector",
                 "embed_vision", "embed_audio", "visual")


class FiLMInjection(nn.Module):
    """h -> sum_c gate_c * (gamma_c * h + beta_c), with [gamma_c, beta_c] = W @ mean_k(tokens_c): one einsum."""

    def __init__(self, width: int, n_channels: int):
        super().__init__()
        self.film = nn.Linear(width, 2 * width, bias=False)
        self.gate = nn.Parameter(torch.zeros(n_channels))

    def forward(self, x: Tensor, tokens: Tensor) -> Tensor:
        gamma, beta = self.film(tokens.mean(dim=2)).chunk(2, dim=-1)  # [B,C,M] each
        g = self.gate.view(1, -1, 1)
        return x * (g * gamma).sum(1)[:, None] + (g * beta).sum(1)[:, None]


class HFCache:
    """Decoding state for a Hugging Face base: its own KV cache plus our left-padding bookkeeping."""

    def __init__(self, batch: int, max_len: int, device: torch.device):
        from transformers import DynamicCache

        self.kv = DynamicCache()
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.n_real = torch.zeros(batch, dtype=torch.long, device=device)
        self.length = 0
        self.adapter_tokens: Tensor | None = None


def _text_config(config: Any) -> Any:
    return getattr(config, "text_config", None) or config


def drop_unused_towers(model: nn.Module, names: Sequence[str] = UNUSED_TOWERS) -> list[str]:
    """Set every submodule called one of `names` to None; returns the dotted paths dropped."""
    dropped = []
    for path, module in list(model.named_modules()):
        for name, child in list(module.named_children()):
            if name in names and child is not None:
                setattr(module, name, None)
                dropped.append(f"{path}.{name}" if path else name)
    return dropped


def _decoder_blocks(base: nn.Module, n_layers: int) -> nn.ModuleList:
    """The base's list of decoder blocks: the largest ModuleList with one entry per layer."""
    lists = [m for m in base.modules() if isinstance(m, nn.ModuleList) and len(m) == n_layers]
    if not lists:
        raise ValueError(f"cannot find the {n_layers} decoder blocks of {type(base).__name__}")
    return max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))


def load_base(path: str | Path, drop: Sequence[str] = UNUSED_TOWERS,
              weights: bool = True) -> tuple[nn.Module, dict[str, Any]]:
    """Load a frozen base on the CPU and describe it: kind, width, heads, blocks, vocab, dropped parts.

    `weights=False` builds the same module from its config alone (used under the meta device to
    count parameters without reading gigabytes).
    """
    folder = Path(path).expanduser()
    if (folder / META).is_file():
        meta = json.loads((folder / META).read_text())
        if meta["arch"] not in ("native", "baseline"):
            raise ValueError(f"adapter base {folder}: arch '{meta['arch']}' cannot be a base; use a channel-less "
                             "decoder (arch baseline)")
        cfg = ModelConfig.from_dict(meta["config"])
        if cfg.has_channels:
            raise ValueError(f"adapter base {folder}: is a channel model (arch native); use a channel-less base")
        base = ChannelDecoder(cfg)  # built directly (not through models.architectures, which builds adapters)
        if weights:
            check_sha(folder / WEIGHTS, meta.get("weights_sha256"))
            load_weights(base, folder / WEIGHTS)
        info = {"kind": "tinymars", "width": cfg.d_model, "n_head": cfg.n_head, "n_layer": cfg.n_layer,
                "vocab_size": cfg.vocab_size, "max_seq_len": None, "dropped": []}
        identity = (folder / META).read_bytes()
    elif (folder / "config.json").is_file():
        import transformers
        from transformers import AutoConfig, AutoModelForCausalLM

        transformers.utils.logging.disable_progress_bar()
        if weights:
            base = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True, dtype="auto")
        else:
            base = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(folder), local_files_only=True))
        dropped = drop_unused_towers(base, drop)
        text = _text_config(base.config)
        info = {"kind": "hf", "width": text.hidden_size, "n_head": text.num_attention_heads,
                "n_layer": text.num_hidden_layers, "vocab_size": text.vocab_size,
                "max_seq_len": getattr(text, "max_position_embeddings", None), "dropped": dropped}
        identity = (folder / "config.json").read_bytes()
    else:
        raise ValueError(f"adapter base {folder}: is neither one of our model folders (model.json) nor a "
                         "Hugging Face model folder (config.json); point 'base' at one of them")
    base.requires_grad_(False)
    base.eval()
    info["config_sha256"] = hashlib.sha256(identity).hexdigest()
    return base, info


class AdapterLM(nn.Module):
    """A frozen base plus per-block channel adapters; `forward` matches ChannelDecoder's."""

    def __init__(self, base: nn.Module, base_info: dict[str, Any], kind: str, channel_names: Sequence[str],
                 channel_dim: int, channel_tokens: int, seq_len: int, n_head: int | None = None,
                 channel_dims: Sequence[int] | None = None):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"adapter kind {kind!r}: expected one of {', '.join(KINDS)}")
        if not channel_names:
            raise ValueError("arch 'adapter' needs at least one channel (channel_names is empty)")
        # Kept out of the module tree: not in state_dict / parameters(), moved by _apply below.
        object.__setattr__(self, "base", base)
        self.base_info = base_info
        self.kind, self.channel_names, self.channel_dim, self.seq_len = kind, tuple(channel_names), channel_dim, seq_len
        width, C = base_info["width"], len(channel_names)
        self.encoder = ChannelEncoder(C, channel_dim, channel_tokens, width, channel_dims)  # sized per channel
        heads = n_head or base_info["n_head"]
        self.adapters = nn.ModuleList(
            ChannelInjection(width, heads, C) if kind == "cross_attn" else FiLMInjection(width, C)
            for _ in range(base_info["n_layer"]))
        self._tokens: Tensor | None = None
        blocks = base.blocks if base_info["kind"] == "tinymars" else _decoder_blocks(base, base_info["n_layer"])
        for block, adapter in zip(blocks, self.adapters, strict=True):
            block.register_forward_hook(self._hook(adapter))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """As the native's injections: gates 0, encoder std 1, projections random (a zero proj kills the gate)."""
        for name, p in self.named_parameters():
            if name.endswith("gate"):
                p.zero_()
            elif name == "encoder.weight":
                p.normal_(0.0, 1.0)
            else:
                p.normal_(0.0, p.size(1) ** -0.5)

    def _hook(self, adapter: nn.Module):
        def add_adapter(module: nn.Module, args: Any, output: Any) -> Any:
            if self._tokens is None:  # the base called on its own: stay the base
                return output
            h = output[0] if isinstance(output, tuple) else output
            delta = adapter(rms_norm(h).to(self._tokens.dtype), self._tokens).to(h.dtype)
            return (h + delta, *output[1:]) if isinstance(output, tuple) else h + delta

        return add_adapter

    # ---- module plumbing: the base follows device/dtype moves but never trains --------------------
    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001 (torch's signature)
        self.base._apply(fn)
        return super()._apply(fn, recurse)

    def train(self, mode: bool = True) -> AdapterLM:
        super().train(mode)
        self.base.eval()  # base dropout stays off: gates at 0 must reproduce the base exactly
        return self

    # ---- forward ----------------------------------------------------------------------------------
    def encode(self, channels: Tensor | None, batch: int) -> Tensor:
        w = self.encoder.weight
        if channels is None:
            channels = w.new_zeros(batch, len(self.channel_names), self.channel_dim)
        return self.encoder(channels.to(w.dtype))

    @contextlib.contextmanager
    def _reading(self, tokens: Tensor):
        self._tokens = tokens
        try:
            yield
        finally:
            self._tokens = None

    def base_logits(self, idx: Tensor) -> Tensor:
        if self.base_info["kind"] == "tinymars":
            return self.base(idx)[0]
        return self.base(input_ids=idx, use_cache=False).logits.float()

    def forward(self, idx: Tensor, channels: Tensor | None = None, targets: Tensor | None = None,
                loss_mask: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        with self._reading(self.encode(channels, idx.size(0))):
            logits = self.base_logits(idx)
        return logits, None if targets is None else masked_cross_entropy(logits, targets, loss_mask)

    # ---- generation (the interface models.generate uses) --------------------------------------------
    def new_cache(self, batch: int, max_len: int, fixed: bool = False) -> Any:
        if self.base_info["kind"] == "tinymars":
            return self.base.new_cache(batch, max_len, fixed=fixed)
        if fixed:
            raise NotImplementedError("fixed-shape decoding is implemented for our own bases only, "
                                      "not for a Hugging Face base")
        return HFCache(batch, max_len, self.encoder.weight.device)

    def decode(self, idx: Tensor, cache: Any, channels: Tensor | None = None,
               valid: Tensor | None = None) -> Tensor:
        """Logits [B,t,V] of new tokens through the cache; `valid` marks left padding (first call only)."""
        B, t = idx.shape
        if getattr(cache, "adapter_tokens", None) is None:
            cache.adapter_tokens = self.encode(channels, B)
        with self._reading(cache.adapter_tokens):
            if self.base_info["kind"] == "tinymars":
                return self.base.decode(idx, cache, None, valid)
            valid = torch.ones_like(idx, dtype=torch.bool) if valid is None else valid
            pos = (cache.n_real[:, None] + valid.long().cumsum(1) - 1).clamp_min(0)
            cache.valid[:, cache.length:cache.length + t] = valid
            cache.n_real += valid.long().sum(1)
            cache.length += t
            out = self.base(input_ids=idx, attention_mask=cache.valid[:, :cache.length].long(), position_ids=pos,
                            past_key_values=cache.kv, use_cache=True)
            cache.kv = out.past_key_values
            return out.logits.float()

    # ---- introspection ----------------------------------------------------------------------------
    def gate_values(self) -> Tensor:
        return torch.stack([a.gate.detach() for a in self.adapters])

    def alpha_l2(self) -> float:
        return float(self.gate_values().float().norm())

    def base_params(self) -> int:
        return sum(p.numel() for p in self.base.parameters())

    def flops_per_token(self) -> float:
        """Training FLOPs per token: the frozen base runs forward and backward-through-activations (4 x its
        weights, no weight gradients), the adapters 6 x theirs, plus self-attention scores (12 L M T)."""
        info = self.base_info
        base_matmul = self.base_params() - info["vocab_size"] * info["width"]  # embedding lookup is free
        adapter = sum(p.numel() for n, p in self.named_parameters() if not n.startswith("encoder"))
        return 4.0 * base_matmul + 6.0 * adapter + 12.0 * info["n_layer"] * info["width"] * self.seq_len


def build_adapter(spec: dict[str, Any], *, vocab_size: int, seq_len: int, channel_names: Sequence[str],
                  channel_dim: int) -> AdapterLM:
    """spec: base (path), adapter (cross_attn | film, default cross_attn), channel_tokens, channel_dims, n_head,
    drop.

    Under `torch.device("meta")` (parameter counting) the base is built from its config, not loaded.
    """
    check_keys(spec, ADAPTER_KEYS, ("base",))
    weights = torch.get_default_device().type != "meta"
    base, info = load_base(spec["base"], spec.get("drop", UNUSED_TOWERS), weights=weights)
    if info["vocab_size"] != vocab_size:
        raise ValueError(f"adapter base {spec['base']}: has a {info['vocab_size']}-token vocabulary but the data "
                         f"was tokenized with {vocab_size} tokens; a base needs data made with its own tokenizer"
                         + (" (tokenizer: {kind: hf, base: <the base's folder>})" if info["kind"] == "hf" else ""))
    if info["max_seq_len"] is not None and info["max_seq_len"] < seq_len:
        raise ValueError(f"adapter base {spec['base']}: handles {info['max_seq_len']} positions, the data has "
                         f"seq_len {seq_len}; lower pack.seq_len")
    return AdapterLM(base, info, spec.get("adapter", "cross_attn"), channel_names, channel_dim,
                     spec.get("channel_tokens", 2), seq_len, spec.get("n_head"), spec.get("channel_dims"))
