"""Model files and training checkpoints: written atomically, verified by sha256 before they are used.

- A trained model is `model.safetensors` + `model.json` (how to rebuild it through the registry,
  and the sha256 of the weights). Neither holds a timestamp or a wall-clock figure: the same
  training inputs give the same bytes. Beside the last weights, `best/` is a model folder of its own
  holding the weights of the held-out evaluation with the lowest loss (`weights_folder` picks one).
- A training checkpoint is a folder `step-NNNNNNNN/` with the weights (safetensors), the optimizer
  state, the trainer state (step = data position, loss accumulators, RNG) and the metrics so far,
  plus `checkpoint.json` listing every file's sha256 and the run's fingerprint; `best.safetensors`
  when an eval has set a best so far (so a resumed run keeps the same best). It is built under
  a temporary name and renamed into place, so a kill mid-write leaves nothing a resume would trust.

Every load re-hashes; a mismatch raises CheckpointError naming the file. A checkpoint from
another model shape or training recipe is refused with the fields that differ.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save, save_file
from torch import nn

from models.architectures import build, build_info, count_params
from models.weights import META, WEIGHTS, CheckpointError, check_sha, cpu_state, load_weights, replace_atomically
from tinymars.artifacts import canonical_json, hash_bytes, sha256_file, write_atomic

CKPT_META, OPTIMIZER, STATE, METRICS = "checkpoint.json", "optimizer.pt", "state.pt", "metrics.jsonl"
BEST_WEIGHTS = "best.safetensors"  # in a checkpoint: the best-so-far weights
BEST = "best"  # in a model folder: the model folder of the best weights
WEIGHT_CHOICES = ("best", "last")
CKPT_FORMAT = 1


def save_model(model: nn.Module, out_dir: Path, extra: dict[str, Any] | None = None,
               state: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """Save weights (the model's own, or `state`: other weights of the same model) and the metadata needed
    to rebuild them; returns the metadata dict."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = cpu_state(model) if state is None else state
    replace_atomically(out_dir / WEIGHTS, lambda p: save_file(weights, str(p)))
    info = build_info(model)
    cfg = getattr(model, "cfg", None)
    meta = {"arch": info["arch"], "build": info, "config": cfg.to_dict() if cfg is not None else None,
            "num_params": count_params(model), "weights_sha256": sha256_file(out_dir / WEIGHTS), **(extra or {})}
    text = json.dumps(meta, indent=2, sort_keys=True) + "\n"
    replace_atomically(out_dir / META, lambda p: p.write_text(text))
    return meta


def load_model(model_dir: str | Path, device: str = "cpu", base: str | Path | None = None) -> nn.Module:
    """Rebuild a model through the registry from model.json, verify and load model.safetensors.

    `base`: an adapter's frozen base folder, replacing the one model.json records (the base has moved)."""
    model_dir = Path(model_dir)
    if not (model_dir / META).is_file():
        raise CheckpointError(f"{model_dir / META}: missing; {model_dir} is not a trained model folder")
    meta = json.loads((model_dir / META).read_text())
    check_sha(model_dir / WEIGHTS, meta.get("weights_sha256"))
    info = meta["build"]
    if base is not None:
        info = {**info, "spec": {**info["spec"], "base": str(base)}}
    model = build(info["spec"], vocab_size=info["vocab_size"], seq_len=info["seq_len"],
                  channel_names=info["channel_names"], channel_dim=info["channel_dim"], seed=info["seed"])
    load_weights(model, model_dir / WEIGHTS)
    model.build_info = info
    return model.to(device).eval()


def weights_folder(model_dir: str | Path, choice: str) -> tuple[Path, str]:
    """The model folder holding the weights `choice` names ('best' | 'last'), and a line saying which they are.

    'best' is `best/` when training recorded one (model.json `best_step`: some held-out eval gave a finite
    loss); a model with no held-out rows falls back to its last weights, and the line says so.
    """
    if choice not in WEIGHT_CHOICES:
        raise ValueError(f"weights: '{choice}' is not one of {', '.join(WEIGHT_CHOICES)}")
    model_dir = Path(model_dir)
    meta = json.loads((model_dir / META).read_text()) if (model_dir / META).is_file() else {}
    steps = (meta.get("train_config") or {}).get("steps")
    if choice == "best" and meta.get("best_step") is not None:
        return model_dir / BEST, (f"best (step {meta['best_step']}, held-out loss {meta['best_heldout_loss']:.4f}) "
                                  f"of {steps} steps")
    if choice == "best":
        return model_dir, "last (no held-out evaluation recorded a best; fell back to the last weights)"
    return model_dir, "last"


# ---- training checkpoints -------------------------------------------------------------------------
@dataclass(frozen=True)
class Checkpoint:
    """A verified checkpoint folder; `load_*` read its (already hash-checked) files."""

    path: Path
    step: int
    fingerprint: dict[str, Any]
    files: tuple[str, ...] = ()

    def load_model_state(self, model: nn.Module) -> None:
        load_weights(model, self.path / WEIGHTS)

    def best_state(self) -> dict[str, torch.Tensor] | None:
        """The best-so-far weights (CPU), or None when no eval had set a best by this step."""
        return load_file(str(self.path / BEST_WEIGHTS)) if BEST_WEIGHTS in self.files else None

    def optimizer_state(self) -> dict[str, Any]:
        return torch.load(self.path / OPTIMIZER, map_location="cpu", weights_only=True)

    def trainer_state(self) -> dict[str, Any]:
        return torch.load(self.path / STATE, map_location="cpu", weights_only=True)

    def metrics_text(self) -> str:
        return (self.path / METRICS).read_text()


def torch_bytes(obj: Any) -> bytes:
    """torch.save of `obj` with every tensor copied to the CPU (optimizer state, checkpoint state)."""
    buf = io.BytesIO()
    torch.save(_to_cpu(obj), buf)
    return buf.getvalue()


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def checkpoint_files(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any],
                     metrics: str, best: dict[str, torch.Tensor] | None = None) -> dict[str, bytes]:
    """The bytes of one checkpoint (device tensors are copied to the CPU); only the main rank needs them.
    `best`: the best-so-far weights (CPU), when an eval has set them."""
    files = {WEIGHTS: save(cpu_state(model)), OPTIMIZER: torch_bytes(optimizer.state_dict()),
             STATE: torch_bytes(state), METRICS: metrics.encode()}
    return files if best is None else {**files, BEST_WEIGHTS: save(best)}


def write_checkpoint(ckpt_dir: Path, step: int, files: dict[str, bytes], fingerprint: dict[str, Any],
                     keep: int = 2) -> Path:
    """Publish `step-NNNNNNNN/` atomically (temporary folder, manifest last, rename); keep the newest `keep`."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = ckpt_dir / f"step-{step:08d}"
    tmp = ckpt_dir / f".tmp-step-{step:08d}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        for name, data in files.items():
            write_atomic(tmp / name, data)
        meta = {"format": CKPT_FORMAT, "step": step, "fingerprint": fingerprint,
                "files": {name: hash_bytes(data) for name, data in files.items()}}
        write_atomic(tmp / CKPT_META, json.dumps(meta, indent=1, sort_keys=True))
        if final.exists():  # a rerun past the same step: replace it
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in sorted(ckpt_dir.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def verify_checkpoint(folder: Path) -> Checkpoint:
    """Re-hash every file of a checkpoint folder; CheckpointError names the first bad file."""
    folder = Path(folder)
    try:
        meta = json.loads((folder / CKPT_META).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{folder / CKPT_META}: unreadable ({exc}); the checkpoint is incomplete") from None
    if meta.get("format") != CKPT_FORMAT:
        raise CheckpointError(f"{folder / CKPT_META}: format {meta.get('format')} is not {CKPT_FORMAT}")
    for name in (WEIGHTS, OPTIMIZER, STATE, METRICS):
        if name not in meta["files"]:
            raise CheckpointError(f"{folder / CKPT_META}: lists no {name}; the checkpoint is incomplete")
    for name, sha in meta["files"].items():  # the required files and the optional best weights
        check_sha(folder / name, sha)
    return Checkpoint(folder, int(meta["step"]), meta["fingerprint"], tuple(sorted(meta["files"])))


def fingerprint_differences(want: dict[str, Any], got: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted names of the fields where two fingerprints differ, with both values."""
    out = []
    for key in sorted(set(want) | set(got)):
        a, b = want.get(key), got.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += fingerprint_differences(a, b, f"{prefix}{key}.")
        elif canonical_json(a) != canonical_json(b):
            out.append(f"{prefix}{key}: checkpoint {json.dumps(b, default=str)} vs now {json.dumps(a, default=str)}")
    return out


def latest_checkpoint(ckpt_dir: Path, fingerprint: dict[str, Any],
                      warn: Callable[[str], Any] = print) -> Checkpoint | None:
    """The newest checkpoint that verifies, or None. A corrupt one is reported and skipped (an older one
    may still be good); one written for another model or recipe is an error, never silently used."""
    ckpt_dir = Path(ckpt_dir)
    for folder in sorted(ckpt_dir.glob("step-*"), reverse=True):
        try:
            ckpt = verify_checkpoint(folder)
        except CheckpointError as exc:
            warn(f"skipping checkpoint: {exc}")
            continue
        diffs = fingerprint_differences(fingerprint, ckpt.fingerprint)
        if diffs:
            raise CheckpointError(f"{folder}: was written for another model or training recipe "
                                  f"({'; '.join(diffs[:5])}); use a fresh checkpoint folder or the old settings")
        return ckpt
    return None
