"""A trained model's weights file: written atomically, verified by sha256 and by shape before use.

Kept apart from `models.checkpoint` (which rebuilds models through `models.architectures`) so that an
architecture that wraps one of our trained models (the adapter's base) can load it without an import
circle back through the registry.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from tinymars.artifacts import sha256_file

WEIGHTS, META = "model.safetensors", "model.json"


class CheckpointError(RuntimeError):
    """A model file or checkpoint that must not be used; the message names the file and the fix."""


def replace_atomically(path: Path, write: Callable[[Path], Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict on the CPU, contiguous (what safetensors needs; also moves XLA/CUDA tensors)."""
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def check_sha(path: Path, want: str | None) -> None:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; the folder is incomplete, rebuild it (e.g. rerun training)")
    if want is not None and sha256_file(path) != want:
        raise CheckpointError(f"{path}: sha256 does not match the one recorded when it was written; the file is "
                              "corrupt or was changed; delete the folder and rebuild it")


def load_weights(model: nn.Module, path: Path) -> None:
    """Strict load with an error that names the file and the tensors that do not fit this model."""
    state = load_file(str(path))
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [f"{k}: file {list(state[k].shape)} vs model {list(own[k].shape)}"
             for k in sorted(set(own) & set(state)) if state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        parts = [f"shapes differ ({'; '.join(wrong[:4])})"] if wrong else []
        parts += [f"missing {missing[:4]}"] if missing else []
        parts += [f"unexpected {unexpected[:4]}"] if unexpected else []
        raise CheckpointError(f"{path}: was written by a model of another shape: {', '.join(parts)}; "
                              "load it with the model spec it was trained with")
    model.load_state_dict(state, strict=True)


