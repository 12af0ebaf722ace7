"""The STEER arm: a row's state given to the model by activation addition instead of a channel.

For each eval row, the vector added to the residual stream after block `layer` (the readout's
layer i, see models.activations) at every position, prompt and generated tokens alike, is

    sum over concepts  multiplier x concept_coefficient(concept, row state) x layer_norm x unit direction

`concept_coefficient` (corpus.concepts) places the row between the concept's poles in [-1, 1];
`layer_norm` is the mean residual-stream L2 norm at that layer (readout.json), so `multiplier` is a
fraction of the stream's own scale and means the same thing at any width or depth. Rows outside the
concepts (memory / identity / continuity) get a zero vector: STEER carries only the directional concepts.

The hook is a forward hook on the block, so it sees the prefill and every cached decode step the
same way (and a full recompute without the cache): the KV cache stores keys/values computed from the
steered stream, exactly as if the whole sequence were run again. Vectors are per row ([B, H]), so one
batched generate call serves rows with different states; a row whose vector is zero is left bit for
bit untouched (torch.where, not `+ 0`, which would turn -0.0 into 0.0). Shapes never depend on the
data, so the fixed-shape (XLA) path keeps one graph.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from corpus.concepts import concept_coefficient
from models.activations import residual_blocks
from tinymars.domain import CONCEPTS


@contextmanager
def add_to_residual(model: nn.Module, layer: int, vectors: Tensor) -> Iterator[None]:
    """While active, every forward adds `vectors[b]` ([B, H]) to block `layer`'s output at every position of row b."""
    blocks = residual_blocks(model)
    if not 0 <= layer < len(blocks):
        raise ValueError(f"steer layer {layer} is not in 0..{len(blocks) - 1} (the model has {len(blocks)} blocks)")
    if vectors.dim() != 2:
        raise ValueError(f"steering vectors must be [batch, hidden], got {list(vectors.shape)}")
    active = vectors.ne(0).any(dim=-1)
    if not bool(active.any()):  # nothing to add (multiplier 0, or no row with a concept): no hook at all
        yield
        return

    def steer(_module: nn.Module, _args: object, output: Any) -> Any:
        hidden = output[0] if isinstance(output, tuple) else output
        if hidden.shape[0] != vectors.shape[0] or hidden.shape[-1] != vectors.shape[-1]:
            raise ValueError(f"steering vectors {list(vectors.shape)} do not fit the hidden states "
                             f"{list(hidden.shape)} of block {layer}")
        v = vectors.to(hidden.device, hidden.dtype)[:, None, :]
        steered = torch.where(active.to(hidden.device)[:, None, None], hidden + v, hidden)
        return (steered, *output[1:]) if isinstance(output, tuple) else steered

    handle = blocks[layer].register_forward_hook(steer)
    try:
        yield
    finally:
        handle.remove()


@dataclass(frozen=True)
class Steering:
    """One generate call's steering: the layer, and one vector per prompt ([N, H], zeros: not steered)."""

    layer: int
    vectors: Tensor

    def batch(self, rows: list[int], size: int) -> Tensor:
        """The vectors of these prompt indices, zero rows appended up to `size` (fixed-shape padding rows)."""
        v = self.vectors[rows]
        return torch.cat([v, v.new_zeros(size - len(rows), v.size(1))]) if size > len(rows) else v


@dataclass(frozen=True)
class SteerArm:
    """What the STEER arm adds: unit directions per concept at one layer, the layer's norm, the multiplier."""

    layer: int
    directions: dict[str, Tensor]
    layer_norm: float
    multiplier: float
    method: str
    layer_rule: str

    def covers(self, row: dict[str, Any]) -> bool:
        """Whether the arm generates for this row: only the directional concepts' rows."""
        return row["capability"] in self.directions

    def steering(self, states: list[dict[str, Any]]) -> Steering:
        """Per-row vectors for rows with these channel states."""
        hidden = next(iter(self.directions.values())).numel()
        out = torch.zeros(len(states), hidden)
        scale = self.multiplier * self.layer_norm
        for r, state in enumerate(states):
            for concept, direction in self.directions.items():
                coef = concept_coefficient(concept, state) if concept in state else 0.0
                if coef and scale:
                    out[r] += (scale * coef) * direction
        return Steering(self.layer, out)

    def describe(self) -> dict[str, Any]:
        """For measurements.json (and so the report): how the arm was injected."""
        return {"layer": self.layer, "layer_rule": self.layer_rule, "multiplier": self.multiplier,
                "method": self.method, "layer_norm": round(self.layer_norm, 6), "concepts": list(self.directions)}


def choose_layer(arm_layer: int | str, meta: dict[str, Any]) -> tuple[int, str]:
    """(layer, the rule that chose it). An int is taken as given (it must have been read out).

    "auto": the layer the steer stage chose and recorded in readout.json (`arm_layer`), so the arm adds at
    the layer whose quality.json figures the steer stage reports; a readout without it (written elsewhere)
    gets the same rule here, models.steering.resolve_arm_layer (the middle read layer).
    """
    from models.steering import resolve_arm_layer

    layers = sorted(int(i) for i in meta["layers"])
    if arm_layer != "auto":
        return resolve_arm_layer(arm_layer, layers), "set in the profile"
    if meta.get("arm_layer") in layers:
        return int(meta["arm_layer"]), "auto: the steer stage's choice in readout.json"
    return resolve_arm_layer("auto", layers), "auto: the middle read layer"


def load_steer_arm(steer_dir: Path, arm_layer: int | str, multiplier: float) -> SteerArm:
    """The STEER arm from a steer artifact folder (readout.safetensors + readout.json)."""
    from models.steering import load_readout

    vectors, meta = load_readout(Path(steer_dir))
    layer, rule = choose_layer(arm_layer, meta)
    concepts = [c for c in meta["concepts"] if c in CONCEPTS]
    if not concepts:
        raise ValueError(f"{steer_dir}: the readout holds none of the steering concepts {CONCEPTS}")
    rows = vectors[layer]
    directions = {c: rows[meta["concepts"].index(c)] / rows[meta["concepts"].index(c)].norm() for c in concepts}
    return SteerArm(layer=layer, directions=directions, layer_norm=float(meta["layer_norms"][str(layer)]),
                    multiplier=float(multiplier), method=str(meta["method"]), layer_rule=rule)
