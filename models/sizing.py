"""From a profile's model entries to registry specs: bracketing baselines are sized by parameter count.

A baseline entry with `bracket: below` (or `above`) and no `n_layer` becomes the deepest (or
shallowest) channel-less decoder of the native's width whose parameter count is below (above)
the native's, so "the gain is the channel pathway, not size" is a comparison you can read off.
Counting builds models on the meta device: no memory, no init time, exact counts.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from models.architectures import build, count_params

DECODER_SHAPE = ("n_head", "d_model", "mlp_ratio")
MAX_LAYERS = 256


def count_spec_params(spec: dict[str, Any], **build_kw: Any) -> int:
    """Exact parameter count of a registry spec, without allocating or initialising weights."""
    with torch.device("meta"):
        return count_params(build(spec, **build_kw))


def bracket_depth(native: dict[str, Any], baseline: dict[str, Any], side: str, **build_kw: Any) -> int:
    """n_layer of the channel-less baseline just below (or above) the native's parameter count."""
    if side not in ("below", "above"):
        raise ValueError(f"bracket must be 'below' or 'above', got {side!r}")
    target = count_spec_params(native, **build_kw)

    def params(n_layer: int) -> int:
        return count_spec_params({**baseline, "n_layer": n_layer}, **build_kw)

    if side == "below":
        if params(1) >= target:
            raise ValueError(f"no baseline is smaller than the native ({target:,} parameters): even 1 layer "
                             f"has {params(1):,}; give the baseline a smaller d_model")
        n = 1
        while n + 1 <= MAX_LAYERS and params(n + 1) < target:
            n += 1
        return n
    n = 1
    while params(n) <= target:
        n += 1
        if n > MAX_LAYERS:
            raise ValueError(f"no baseline up to {MAX_LAYERS} layers exceeds the native's {target:,} parameters")
    return n


def registry_specs(models: Sequence[dict[str, Any]], *, vocab_size: int, seq_len: int,
                   channel_names: Sequence[str], channel_dim: int, channel_tokens: int) -> dict[str, dict[str, Any]]:
    """Profile model entries (`ModelSpec.model_dump()` dicts) -> {name: registry spec}.

    Unset fields are dropped; natives and adapters get the profile's channel token count; a
    bracketing baseline takes the native's shape for whatever it leaves out, and its depth from
    `bracket_depth` against the first native entry.
    """
    build_kw = {"vocab_size": vocab_size, "seq_len": seq_len, "channel_names": tuple(channel_names),
                "channel_dim": channel_dim}
    plain = [{k: v for k, v in m.items() if v is not None} for m in models]
    natives = [m for m in plain if m["arch"] == "native"]
    out: dict[str, dict[str, Any]] = {}
    for entry in plain:
        spec = {k: v for k, v in entry.items() if k != "name"}
        if spec["arch"] in ("native", "adapter"):
            spec["channel_tokens"] = channel_tokens
        if spec["arch"] == "adapter":  # the trainer runs elsewhere (another cwd, a worker): no relative paths
            spec["base"] = str(Path(spec["base"]).expanduser().resolve())
        if spec["arch"] == "baseline" and "bracket" in spec:
            side = spec.pop("bracket")
            if not natives:
                raise ValueError(f"model {entry['name']!r}: bracket needs a model with arch 'native'")
            native = {k: v for k, v in natives[0].items() if k != "name"} | {"channel_tokens": channel_tokens}
            spec = {**{k: native[k] for k in DECODER_SHAPE if k in native}, **spec}
            spec["n_layer"] = bracket_depth(native, spec, side, **build_kw)
        out[entry["name"]] = spec
    return out


def profile_specs(profile: Any, pack_meta: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Registry specs of a profile's `train.models`, for the packed data described by `pack_meta` (pack.json).

    Without pack_meta the data's shape is read from the profile (what the pack stage will produce),
    so model sizes can be shown before any data exists.
    """
    meta = pack_meta or {"vocab_size": profile.tokenizer.vocab_size, "seq_len": profile.pack.seq_len,
                         "channel_names": list(profile.channels.names), "channel_dim": profile.channels.max_dim}
    return registry_specs([m.model_dump(mode="json") for m in profile.train.models],
                          vocab_size=meta["vocab_size"], seq_len=meta["seq_len"],
                          channel_names=meta["channel_names"], channel_dim=meta["channel_dim"],
                          channel_tokens=next(iter(profile.channels.enabled.values())).tokens)
