"""Write and read a trained model as model.safetensors + model.json.

Both files are written under a temporary name and renamed into place, so a crash never
leaves a truncated model behind a valid-looking name. Neither holds a timestamp or a
wall-clock figure: the same training inputs give the same bytes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import nn

from models.registry import build, build_info, count_params

WEIGHTS, META = "model.safetensors", "model.json"


def _replace_atomically(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def save_model(model: nn.Module, out_dir: Path, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Save weights and the metadata needed to rebuild them; returns the metadata dict."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    _replace_atomically(out_dir / WEIGHTS, lambda p: save_file(state, str(p)))
    info = build_info(model)
    cfg = getattr(model, "cfg", None)
    meta = {"arch": info["arch"], "build": info, "config": cfg.to_dict() if cfg is not None else None,
            "num_params": count_params(model), **(extra or {})}
    text = json.dumps(meta, indent=2, sort_keys=True) + "\n"
    _replace_atomically(out_dir / META, lambda p: p.write_text(text))
    return meta


def load_model(model_dir: str | Path, device: str = "cpu") -> nn.Module:
    """Rebuild a model through the registry from model.json, then load model.safetensors (strict)."""
    model_dir = Path(model_dir)
    info = json.loads((model_dir / META).read_text())["build"]
    model = build(info["spec"], vocab_size=info["vocab_size"], seq_len=info["seq_len"],
                  channel_names=info["channel_names"], channel_dim=info["channel_dim"], seed=info["seed"])
    model.load_state_dict(load_file(str(model_dir / WEIGHTS)), strict=True)
    model.build_info = info
    return model.to(device).eval()
