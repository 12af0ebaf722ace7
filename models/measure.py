"""What the eval measures on the models themselves, beyond their generations: relief-valve losses and gates.

Relief valve: the held-out target loss of every trained model, with its channels zeroed (and, for a
channel model, on), so the scorers can compare the native with channels zeroed against the
channel-less baselines (scorers.relief). Every row is scored whole, in packed windows for models that
read them (models.trainer.heldout_loss: the per-row numbers up to float rounding), so the native and
the baselines are measured alike. The loss is taken at target positions only: a model that reads windows
runs its head there alone (`return_logits=False`, as in training), so no [batch, seq, vocab] logits
exist. With a `runtime` (models.generate.eval_runtime) each model is moved to its device in turn (one
model on the accelerator at a time) and scored under its autocast (bf16 on accelerators).
Gates: the evaluated model's ReZero gate values per layer and channel, and their L2 norm.
Both land in the eval artifact's `measurements.json`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from torch import nn

from models.data import PackedRows
from models.distributed import Runtime
from models.trainer import heldout_loss


def relief_losses(models: Mapping[str, nn.Module], heldout: PackedRows, batch_size: int, seq_len: int,
                  pad_id: int, *, runtime: Runtime | None = None) -> dict[str, dict[str, Any]]:
    """{model name: {has_channels, channels_zeroed: loss, channels_on: loss (channel models only)}}, by name.

    batch_size is sequences per forward: windows of seq_len for models that read them, rows otherwise.
    Without a runtime each model is scored where it is, in fp32.
    """
    kw = dict(batch_size=batch_size, seq_len=seq_len, pad_id=pad_id, runtime=runtime)
    relief = {}
    for name, model in sorted(models.items()):
        has_channels = bool(getattr(getattr(model, "cfg", None), "has_channels", False))
        with _placed(model, runtime):
            relief[name] = {"has_channels": has_channels,
                            "channels_zeroed": _finite(heldout_loss(model, heldout, zero_channels=True, **kw))}
            if has_channels:
                relief[name]["channels_on"] = _finite(heldout_loss(model, heldout, zero_channels=False, **kw))
    return relief


@contextmanager
def _placed(model: nn.Module, runtime: Runtime | None) -> Iterator[None]:
    """The model on the runtime's device while scored, then back where it was."""
    home = next(model.parameters()).device
    if runtime is None or runtime.device == home:
        yield
        return
    model.to(runtime.device)
    try:
        yield
    finally:
        model.to(home)


def gate_summary(model: nn.Module, channel_names: Sequence[str]) -> dict[str, Any]:
    """The ReZero gates of a channel model ({} for a model without gates), rounded to 6 decimals."""
    if not hasattr(model, "gate_values"):
        return {}
    return {"alpha_l2": float(model.alpha_l2()), "channel_names": list(channel_names),
            "per_layer": [[round(float(x), 6) for x in layer] for layer in model.gate_values().tolist()]}


def _finite(loss: dict[str, Any]) -> dict[str, Any]:
    """NaN/inf -> None, so measurements.json stays strict JSON."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in loss.items()}
