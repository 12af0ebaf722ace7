"""The one model registry: a profile's `train.models` entry (a plain dict) -> an nn.Module.

Every architecture is added here, through `architecture(name)`, the one route (a researcher's own
arch uses it too). The modules that define architectures (gpt, adapter, vocab_graph, vocab_conv)
do not import this one, so there is no import circle; the trainer, generation and `load_model`
only ever go through `build`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from models.adapter import build_adapter
from models.config import ModelConfig, check_keys
from models.gpt import ChannelDecoder
from models.vocab_conv import build_vocab_conv
from models.vocab_graph import build_vocab_graph
from tinymars.domain import DECODER_REQUIRED

Builder = Callable[..., nn.Module]
ARCHITECTURES: dict[str, Builder] = {}

DECODER_KEYS = frozenset({"n_layer", "n_head", "d_model", "mlp_ratio", "dropout"})
NATIVE_KEYS = frozenset({"channel_tokens", "channel_dims", "channels"})


def architecture(name: str) -> Callable[[Builder], Builder]:
    """Decorator adding a builder `fn(spec, *, vocab_size, seq_len, channel_names, channel_dim)`."""

    def deco(fn: Builder) -> Builder:
        if name in ARCHITECTURES:
            raise ValueError(f"architecture {name!r} is already registered")
        ARCHITECTURES[name] = fn
        return fn

    return deco


@architecture("native")
def build_native(spec: dict[str, Any], *, vocab_size: int, seq_len: int, channel_names: Sequence[str],
                 channel_dim: int) -> ChannelDecoder:
    """The channel decoder. `channel_dims` (one width per channel, models.sizing fills it in from the profile)
    sizes each channel's encoder to its own width; left out, every channel is `channel_dim` wide. `channels`
    (a subset of channel_names, the data's) makes a model that reads only those: it is still given every
    channel and keeps its own, and its encoder and gates exist for its channels alone."""
    check_keys(spec, DECODER_KEYS | NATIVE_KEYS, DECODER_REQUIRED)
    if not channel_names:
        raise ValueError("arch 'native' needs at least one channel (channel_names is empty)")
    kw = {k: spec[k] for k in DECODER_KEYS | NATIVE_KEYS if k in spec and k != "channels"}
    if "channel_dims" in kw and len(kw["channel_dims"]) != len(channel_names):
        raise ValueError(f"spec channel_dims {list(kw['channel_dims'])}: needs one width per channel "
                         f"{list(channel_names)}; leave it out to size every channel channel_dim ({channel_dim})")
    names = tuple(channel_names)
    if spec.get("channels") is not None:
        wanted = list(spec["channels"])
        unknown = [c for c in wanted if c not in names]
        if unknown or not wanted or len(set(wanted)) != len(wanted):
            raise ValueError(f"spec channels {wanted}: give distinct names among the data's channels {list(names)}")
        read = tuple(c for c in names if c in wanted)  # the data's order: one subset, one layout
        if "channel_dims" in kw:
            kw["channel_dims"] = [kw["channel_dims"][names.index(c)] for c in read]
        kw["input_channels"], names = names, read
    return ChannelDecoder(ModelConfig(vocab_size=vocab_size, seq_len=seq_len,
                                      channel_names=names, channel_dim=channel_dim, **kw))


@architecture("baseline")
def build_baseline(spec: dict[str, Any], *, vocab_size: int, seq_len: int, channel_names: Sequence[str] = (),
                   channel_dim: int = 0) -> ChannelDecoder:
    """The same decoder with no channels; channel fields are accepted (shared profiles) and ignored."""
    check_keys(spec, DECODER_KEYS | NATIVE_KEYS, DECODER_REQUIRED)
    kw = {k: spec[k] for k in DECODER_KEYS if k in spec}
    return ChannelDecoder(ModelConfig(vocab_size=vocab_size, seq_len=seq_len, **kw))


def build(spec: dict[str, Any], *, vocab_size: int, seq_len: int, channel_names: Sequence[str] = (),
          channel_dim: int = 0, seed: int | None = None) -> nn.Module:
    """Build a freshly initialised model from a spec dict.

    With `seed` the init depends on it alone (the caller's RNG is left untouched); without it the
    init draws from the global torch RNG, so a caller's `torch.manual_seed` decides it.

    The build arguments are kept on the model (`model.build_info`) so the trainer can write
    them to model.json and `load_model` can rebuild the exact same module later.
    """
    arch = spec.get("arch")
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown model arch {arch!r} (key 'arch'); allowed: {sorted(ARCHITECTURES)}")
    info = {"arch": arch, "spec": dict(spec), "vocab_size": int(vocab_size), "seq_len": int(seq_len),
            "channel_names": list(channel_names), "channel_dim": int(channel_dim), "seed": seed}
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        model = ARCHITECTURES[arch](dict(spec), vocab_size=vocab_size, seq_len=seq_len,
                               channel_names=tuple(channel_names), channel_dim=channel_dim)
    model.build_info = info
    return model


def build_info(model: nn.Module) -> dict[str, Any]:
    """How to rebuild `model`: recorded by `build`, or derived for a hand-made ChannelDecoder."""
    info = getattr(model, "build_info", None)
    if info is not None:
        return info
    if not isinstance(model, ChannelDecoder):
        raise ValueError(f"{type(model).__name__} was not made by models.architectures.build; cannot describe it")
    cfg = model.cfg
    spec = {"arch": "native" if cfg.has_channels else "baseline", "n_layer": cfg.n_layer,
            "n_head": cfg.n_head, "d_model": cfg.d_model, "mlp_ratio": cfg.mlp_ratio, "dropout": cfg.dropout}
    if cfg.has_channels:
        spec["channel_tokens"] = cfg.channel_tokens
    names = list(cfg.input_channels or cfg.channel_names)
    if cfg.channel_dims:  # one width per channel of the data: a subset's unread channels never reach the encoder
        dims = dict(zip(cfg.channel_names, cfg.channel_dims, strict=True))
        spec["channel_dims"] = [dims.get(c, cfg.channel_dim) for c in names]
    if cfg.input_channels:
        spec["channels"] = list(cfg.channel_names)
    return {"arch": spec["arch"], "spec": spec, "vocab_size": cfg.vocab_size, "seq_len": cfg.seq_len,
            "channel_names": names, "channel_dim": cfg.channel_dim, "seed": None}


def count_params(model: nn.Module) -> int:
    """Every parameter of the module tree (an adapter keeps its frozen base outside it)."""
    return sum(p.numel() for p in model.parameters())


def count_trainable(model: nn.Module) -> int:
    """The parameters the optimizer updates: equal to count_params when nothing counted is frozen."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


architecture("adapter")(build_adapter)
architecture("vocab_graph")(build_vocab_graph)
architecture("vocab_conv")(build_vocab_conv)
