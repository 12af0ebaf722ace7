"""Relief valve: does the native model, with its channels zeroed, still model the held-out targets as
well as the channel-less baselines? (If the channels took load off the weights, zeroing them costs.)

Reads the losses the eval stage measured (nats per target token and bits per byte, per model, with
channels zeroed and, for channel models, on) and puts the native's zeroed loss against each baseline.
A positive delta means the native is worse than that baseline once its channels are gone.
"""

from __future__ import annotations

from typing import Any


def score_relief(relief: dict[str, Any], target: str | None) -> dict[str, Any]:
    """Per model the measured losses; per baseline the native-zeroed minus baseline deltas."""
    models = {name: dict(r) for name, r in sorted(relief.items())}
    out: dict[str, Any] = {"target": target, "models": models, "versus": []}
    native = models.get(target or "")
    if native is None:
        return out
    zero = native["channels_zeroed"]
    on = native.get("channels_on")
    if on is not None:
        out["channel_benefit_nats"] = zero["nats_per_token"] - on["nats_per_token"]
    for name, r in models.items():
        if name == target or r.get("has_channels"):
            continue  # the baselines are the channel-less models
        base = r["channels_zeroed"]
        bpb = (None if zero.get("bits_per_byte") is None or base.get("bits_per_byte") is None
               else zero["bits_per_byte"] - base["bits_per_byte"])
        out["versus"].append({"baseline": name, "delta_nats": zero["nats_per_token"] - base["nats_per_token"],
                              "delta_bpb": bpb})
    return out
