"""From a profile's model entries to registry specs: bracketing baselines are sized by parameter count.

A baseline entry with `bracket: below` (or `above`) becomes the channel-less decoder whose parameter
count is nearest BRACKET_MARGIN (10%) below (above) the native's, and strictly on that side, as in the
reference (100.8M / 110.2M / 120.3M: -8.5% / +9.2%). Two baselines a fifth apart in size that tie each
other while the native beats both make "the gain is the channel pathway, not size" readable.

Which dimension is sized (the one the entry leaves out; giving both n_layer and d_model is an error):
- neither (the default): the native's depth and heads, the width sized (a multiple of 2 x n_head, so the
  head dim stays even for RoPE). All three models then have the same number of layers, so the comparison
  is not a depth confound: the baselines differ from the native in width and the channel pathway only.
  Sizing the depth at the native's width instead puts both baselines deeper than the native: its channel
  pathway (a cross-attention a third the size of a block in every block, plus the encoder) weighs about
  four of its blocks, so iter7's 8-layer native would face 11- and 14-layer baselines.
- d_model given: that width, the depth sized.
- n_layer given: that depth, the width sized.

Counting builds models on the meta device: no memory, no init time, exact counts; counts grow with the
sized dimension, so a bisection needs a dozen builds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import torch

from models.architectures import build, count_params

DECODER_SHAPE = ("n_head", "mlp_ratio")  # what a bracketing baseline takes from the native unless it sets it
BRACKET_MARGIN = 0.10
MAX_LAYERS = 256
MAX_WIDTH = 65536


def count_spec_params(spec: dict[str, Any], **build_kw: Any) -> int:
    """Exact parameter count of a registry spec, without allocating or initialising weights."""
    with torch.device("meta"):
        return count_params(build(spec, **build_kw))


def bracket_depth(native: dict[str, Any], baseline: dict[str, Any], side: str, **build_kw: Any) -> int:
    """n_layer of the channel-less baseline just below (or above) the native's parameter count, at its width."""
    target = count_spec_params(native, **build_kw)
    return _nearest_on_side(lambda n: count_spec_params({**baseline, "n_layer": n}, **build_kw), target, side,
                            margin=0.0, limit=MAX_LAYERS, what=f"{baseline.get('d_model')}-wide baseline depth")


def bracket_baseline(native: dict[str, Any], baseline: dict[str, Any], side: str, margin: float = BRACKET_MARGIN,
                     **build_kw: Any) -> dict[str, Any]:
    """The baseline spec with n_layer and d_model set: parameters nearest (1 -/+ margin) x the native's.

    `baseline` gives n_head (and mlp_ratio) and at most one of n_layer / d_model; the other is sized
    (module docstring). Left both out, the depth is the native's.
    """
    if "n_layer" in baseline and "d_model" in baseline:
        raise ValueError("bracket sizes n_layer or d_model; give at most one of them (or drop bracket)")
    target = count_spec_params(native, **build_kw)
    if "d_model" in baseline:
        n_layer = _nearest_on_side(lambda n: count_spec_params({**baseline, "n_layer": n}, **build_kw), target,
                                   side, margin, MAX_LAYERS, f"depth at d_model {baseline['d_model']}")
        return {**baseline, "n_layer": n_layer}
    spec = {"n_layer": native["n_layer"], **baseline}
    step = 2 * spec["n_head"]  # d_model divisible by n_head with an even head dim (RoPE)
    steps = _nearest_on_side(lambda s: count_spec_params({**spec, "d_model": s * step}, **build_kw), target,
                             side, margin, MAX_WIDTH // step, f"width at {spec['n_layer']} layers")
    return {**spec, "d_model": steps * step}


def _nearest_on_side(params: Callable[[int], int], native: int, side: str, margin: float, limit: int,
                     what: str) -> int:
    """The x in 1..limit whose params(x) (increasing in x) is nearest native x (1 -/+ margin), strictly below
    (above) native."""
    if side not in ("below", "above"):
        raise ValueError(f"bracket must be 'below' or 'above', got {side!r}")
    params = cache(params)

    def last_at_most(value: float) -> int:  # bisection: the last x in 0..limit with params(x) <= value
        lo, hi = 0, limit
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if params(mid) <= value else (lo, mid - 1)
        return lo

    if side == "below":  # the x on this side (params(x) < native): first..last
        first, last = 1, last_at_most(native - 1)
        target = native * (1 - margin)
        if last < 1:
            raise ValueError(f"no baseline is smaller than the native ({native:,} parameters): the smallest "
                             f"{what} (1 step) has {params(1):,}; give the baseline a smaller d_model or n_layer")
    else:  # the x with params(x) > native
        first, last = last_at_most(native) + 1, limit
        target = native * (1 + margin)
        if first > limit:
            raise ValueError(f"no baseline {what} up to {limit} steps exceeds the native's {native:,} parameters; "
                             "give the baseline a larger d_model or n_layer")
    x = last_at_most(target)  # params(x) <= target < params(x + 1): the nearest is one of them, kept on the side
    return min({min(max(c, first), last) for c in (x, x + 1)}, key=lambda c: abs(params(c) - target))


def registry_specs(models: Sequence[dict[str, Any]], *, vocab_size: int, seq_len: int,
                   channel_names: Sequence[str], channel_dim: int, channel_tokens: int,
                   channel_dims: Sequence[int] | None = None) -> dict[str, dict[str, Any]]:
    """Profile model entries (`ModelSpec.model_dump()` dicts) -> {name: registry spec}.

    Unset fields are dropped; natives and adapters get the profile's channel token count and each
    channel's own width (`channel_dims`, so no encoder weight only ever multiplies padding); a bracketing
    baseline takes the native's heads and MLP ratio unless it sets them, and its size from
    `bracket_baseline` against the first native entry.
    """
    build_kw = {"vocab_size": vocab_size, "seq_len": seq_len, "channel_names": tuple(channel_names),
                "channel_dim": channel_dim}
    plain = [{k: v for k, v in m.items() if v is not None} for m in models]
    native_extra: dict[str, Any] = {"channel_tokens": channel_tokens}
    if channel_dims is not None:
        native_extra["channel_dims"] = [int(d) for d in channel_dims]
    natives = [m for m in plain if m["arch"] == "native"]
    out: dict[str, dict[str, Any]] = {}
    for entry in plain:
        spec = {k: v for k, v in entry.items() if k != "name"}
        if spec["arch"] in ("native", "adapter"):
            spec |= native_extra
        if spec["arch"] == "adapter":  # the trainer runs elsewhere (another cwd, a worker): no relative paths
            spec["base"] = str(Path(spec["base"]).expanduser().resolve())
        if spec["arch"] == "baseline" and "bracket" in spec:
            side = spec.pop("bracket")
            if not natives:
                raise ValueError(f"model {entry['name']!r}: bracket needs a model with arch 'native'")
            native = {k: v for k, v in natives[0].items() if k != "name"} | native_extra
            spec = {**{k: native[k] for k in DECODER_SHAPE if k in native}, **spec}
            try:
                spec = bracket_baseline(native, spec, side, **build_kw)
            except ValueError as exc:
                raise ValueError(f"model {entry['name']!r} (bracket: {side}): {exc}") from None
        out[entry["name"]] = spec
    return out


def profile_specs(profile: Any, pack_meta: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Registry specs of a profile's `train.models`, for the packed data described by `pack_meta` (pack.json).

    Without pack_meta the data's shape is read from the profile (what the pack stage will produce),
    so model sizes can be shown before any data exists. Each channel's own width: `channel_widths`.
    """
    meta = pack_meta or {"vocab_size": profile.tokenizer.vocab_size, "seq_len": profile.pack.seq_len,
                         "channel_names": list(profile.channels.names), "channel_dim": profile.channels.max_dim}
    enabled = profile.channels.enabled
    unknown = [name for name in meta["channel_names"] if name not in enabled]
    if unknown:
        raise ValueError(f"the packed data has channels {unknown} that channels.enabled does not list; enable "
                         "them in the profile or rebuild the data (--refresh pack)")
    return registry_specs([m.model_dump(mode="json") for m in profile.train.models],
                          vocab_size=meta["vocab_size"], seq_len=meta["seq_len"],
                          channel_names=meta["channel_names"], channel_dim=meta["channel_dim"],
                          channel_tokens=next(iter(enabled.values())).tokens,
                          channel_dims=channel_widths(profile, meta))


def channel_widths(profile: Any, meta: dict[str, Any]) -> list[int] | None:
    """Each packed channel's own width, for encoders sized per channel.

    The pack stores vectors zero-padded to the widest channel (`channel_dim`); the widths are pack.json's
    `channel_dims` where it records them, else the profile's `channels.enabled.<name>.dim` (what the pack
    was made from). Data whose width the profile's widths do not fill (made for other channel settings)
    gets None: every channel as wide as the pack, the padded layout.
    """
    if meta.get("channel_dims") is not None:
        return [int(d) for d in meta["channel_dims"]]
    dims = [profile.channels.enabled[name].dim for name in meta["channel_names"]]
    return dims if dims and max(dims) == meta["channel_dim"] else None
