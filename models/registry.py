"""The one model registry: a profile's `train.models` entry (a plain dict) -> an nn.Module.

Later architectures (adapter, vocabulary-space models) add themselves with `@register("name")`;
the trainer, generation and `load_model` only ever go through `build`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from models.config import ModelConfig
from models.gpt import ChannelDecoder

Builder = Callable[..., nn.Module]
REGISTRY: dict[str, Builder] = {}

# Keys every spec may carry; "name" labels a run (e.g. baseline-small) and is not passed on.
COMMON_KEYS = frozenset({"arch", "name"})
DECODER_KEYS = frozenset({"n_layer", "n_head", "d_model", "mlp_ratio", "dropout"})
DECODER_REQUIRED = ("n_layer", "n_head", "d_model")


def register(name: str) -> Callable[[Builder], Builder]:
    """Decorator adding a builder `fn(spec, *, vocab_size, seq_len, channel_names, channel_dim)`."""

    def deco(fn: Builder) -> Builder:
        if name in REGISTRY:
            raise ValueError(f"architecture {name!r} is already registered")
        REGISTRY[name] = fn
        return fn

    return deco


def check_keys(spec: dict[str, Any], allowed: frozenset[str], required: Sequence[str]) -> None:
    """Reject typos loudly: a misspelt key silently falling back to a default wastes a GPU run."""
    allowed = allowed | COMMON_KEYS
    for key in spec:
        if key not in allowed:
            raise ValueError(f"unknown model spec key {key!r} for arch {spec.get('arch')!r}; "
                             f"allowed: {sorted(allowed)}")
    for key in required:
        if key not in spec:
            raise ValueError(f"model spec for arch {spec.get('arch')!r} is missing {key!r}")


@register("native")
def build_native(spec: dict[str, Any], *, vocab_size: int, seq_len: int, channel_names: Sequence[str],
                 channel_dim: int) -> ChannelDecoder:
    check_keys(spec, DECODER_KEYS | {"channel_tokens"}, DECODER_REQUIRED)
    if not channel_names:
        raise ValueError("arch 'native' needs at least one channel (channel_names is empty)")
    kw = {k: spec[k] for k in DECODER_KEYS | {"channel_tokens"} if k in spec}
    return ChannelDecoder(ModelConfig(vocab_size=vocab_size, seq_len=seq_len,
                                      channel_names=tuple(channel_names), channel_dim=channel_dim, **kw))


@register("baseline")
def build_baseline(spec: dict[str, Any], *, vocab_size: int, seq_len: int, channel_names: Sequence[str] = (),
                   channel_dim: int = 0) -> ChannelDecoder:
    """The same decoder with no channels; channel fields are accepted (shared profiles) and ignored."""
    check_keys(spec, DECODER_KEYS | {"channel_tokens"}, DECODER_REQUIRED)
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
    if arch not in REGISTRY:
        raise ValueError(f"unknown model arch {arch!r} (key 'arch'); allowed: {sorted(REGISTRY)}")
    info = {"arch": arch, "spec": dict(spec), "vocab_size": int(vocab_size), "seq_len": int(seq_len),
            "channel_names": list(channel_names), "channel_dim": int(channel_dim), "seed": seed}
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        model = REGISTRY[arch](dict(spec), vocab_size=vocab_size, seq_len=seq_len,
                               channel_names=tuple(channel_names), channel_dim=channel_dim)
    model.build_info = info
    return model


def build_info(model: nn.Module) -> dict[str, Any]:
    """How to rebuild `model`: recorded by `build`, or derived for a hand-made ChannelDecoder."""
    info = getattr(model, "build_info", None)
    if info is not None:
        return info
    if not isinstance(model, ChannelDecoder):
        raise ValueError(f"{type(model).__name__} was not made by models.registry.build; cannot describe it")
    cfg = model.cfg
    spec = {"arch": "native" if cfg.has_channels else "baseline", "n_layer": cfg.n_layer,
            "n_head": cfg.n_head, "d_model": cfg.d_model, "mlp_ratio": cfg.mlp_ratio, "dropout": cfg.dropout}
    if cfg.has_channels:
        spec["channel_tokens"] = cfg.channel_tokens
    return {"arch": spec["arch"], "spec": spec, "vocab_size": cfg.vocab_size, "seq_len": cfg.seq_len,
            "channel_names": list(cfg.channel_names), "channel_dim": cfg.channel_dim, "seed": None}


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# Architectures in their own modules register themselves on import (after REGISTRY and register exist).
import models.vocab_conv  # noqa: E402,F401  (arch "vocab_conv")
import models.vocab_graph  # noqa: E402,F401  (arch "vocab_graph")
