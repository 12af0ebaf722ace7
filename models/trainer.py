"""Train one model on packed rows: AdamW, warmup + cosine, channel dropout, metrics, a safetensors file.

The same loop serves the native model and its baselines, so any gap between them comes from the
architecture, not from the training recipe.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.checkpoint import load_model, save_model
from models.data import PackedRows, eval_batches, iterate_batches
from models.registry import build_info

__all__ = ["TrainConfig", "train", "heldout_loss", "load_model", "lr_at", "param_groups"]


@dataclass(kw_only=True)
class TrainConfig:
    steps: int
    batch_size: int
    lr: float
    min_lr_frac: float = 0.1
    warmup_steps: int
    weight_decay: float
    grad_clip: float = 1.0
    log_every: int
    eval_every: int
    seed: int
    channel_dropout: float = 0.0
    channel_dropout_warmup: int = 0
    gate_lr_mult: float = 1.0
    device: str = "cpu"
    compile: bool = False  # torch.compile(fullgraph, static shapes) for the train forward


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup over warmup_steps, then cosine from lr down to lr * min_lr_frac. step is 0-based."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_frac + (1.0 - cfg.min_lr_frac) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def channel_dropout_at(step: int, cfg: TrainConfig) -> float:
    """Dropout probability ramps from 0 to channel_dropout, so gates can first find the signal."""
    if cfg.channel_dropout_warmup <= 0:
        return cfg.channel_dropout
    return cfg.channel_dropout * min(1.0, step / cfg.channel_dropout_warmup)


def drop_channels(channels: Tensor, p: float, gen: torch.Generator) -> Tensor:
    """Zero whole channels per row with probability p: teaches the model to work when one is absent."""
    if p <= 0.0 or channels.size(1) == 0:
        return channels
    keep = torch.rand(channels.shape[:2], generator=gen) >= p
    return channels * keep[..., None].to(channels.dtype)


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """Decay matrices only; embeddings, norms, biases and ReZero gates are not pulled to 0.

    Gates get their own LR multiplier: they start at exactly 0 and are the bottleneck for
    channels to matter at all within a short run.
    """
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, plain, gates = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.endswith("gate"):
            gates.append(p)
        elif p.dim() >= 2 and id(p) not in embeddings:
            decay.append(p)
        else:
            plain.append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay, "lr_mult": 1.0},
              {"params": plain, "weight_decay": 0.0, "lr_mult": 1.0},
              {"params": gates, "weight_decay": 0.0, "lr_mult": cfg.gate_lr_mult}]
    return [g for g in groups if g["params"]]


@torch.no_grad()
def heldout_loss(model: nn.Module, rows: PackedRows, batch_size: int, seq_len: int, pad_id: int,
                 zero_channels: bool = False) -> dict[str, float]:
    """Target-token loss over a split; bits_per_byte = total nats / ln 2 / total target bytes."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, tokens, nbytes = 0.0, 0.0, 0
    for b in eval_batches(rows, batch_size, seq_len, pad_id):
        channels = torch.zeros_like(b["channels"]) if zero_channels else b["channels"]
        logits, _ = model(b["idx"].to(device), channels.to(device))
        targets = b["targets"].to(device).flatten()
        ce = F.cross_entropy(logits.flatten(0, 1).float(), targets, reduction="none")
        mask = b["loss_mask"].to(device).flatten().double()
        total += float((ce.double() * mask).sum())
        tokens += float(mask.sum())
        nbytes += int(b["target_bytes"].sum())
    model.train(was_training)
    return {"nats_per_token": total / max(tokens, 1.0), "total_nats": total, "tokens": int(tokens),
            "bits_per_byte": total / math.log(2) / nbytes if nbytes > 0 else float("nan")}


def _finite(x: float | None) -> float | None:
    """NaN/inf -> None, so the JSON files stay strict JSON."""
    return x if x is not None and math.isfinite(x) else None


def _gates(model: nn.Module) -> tuple[float, list[list[float]]]:
    if not hasattr(model, "gate_values"):
        return 0.0, []
    return float(model.alpha_l2()), model.gate_values().float().cpu().tolist()


def train(model: nn.Module, train_rows: PackedRows, heldout_rows: PackedRows | None, cfg: TrainConfig,
          out_dir: Path, pad_id: int, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train in place, write metrics.jsonl, model.safetensors and model.json; return the summary."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)  # attention/residual dropout
    gen = torch.Generator().manual_seed(cfg.seed + 1)  # channel dropout, independent of model RNG use
    device = torch.device(cfg.device)
    model.to(device).train()
    seq_len = build_info(model)["seq_len"]
    opt = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)
    step_model = torch.compile(model, fullgraph=True, dynamic=False) if cfg.compile else model
    batches = iterate_batches(train_rows, cfg.batch_size, seq_len, pad_id, cfg.seed)

    def evaluate() -> dict[str, float] | None:
        if heldout_rows is None or len(heldout_rows) == 0:
            return None
        return heldout_loss(model, heldout_rows, cfg.batch_size, seq_len, pad_id)

    metrics_path = out_dir / "metrics.jsonl"
    metrics_path.write_text("")
    loss_sum, n_loss, n_tok, t_last, t_start = torch.zeros((), device=device), 0, 0, time.perf_counter(), None
    final_loss, held = float("nan"), None
    for step in range(1, cfg.steps + 1):
        lr = lr_at(step - 1, cfg)
        for g in opt.param_groups:
            g["lr"] = lr * g["lr_mult"]
        batch = next(batches)
        channels = drop_channels(batch["channels"], channel_dropout_at(step - 1, cfg), gen)
        _, loss = step_model(batch["idx"].to(device), channels.to(device), batch["targets"].to(device),
                             batch["loss_mask"].to(device))
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss_sum += loss.detach()
        n_loss += 1
        n_tok += batch["idx"].numel()
        t_start = t_start or time.perf_counter()  # first step (compile, warm-up) is not timed
        evaluated = step % cfg.eval_every == 0 or step == cfg.steps
        if step % cfg.log_every and not evaluated:
            continue
        now = time.perf_counter()
        final_loss = float(loss_sum) / n_loss  # mean train loss since the last line
        tok_s = n_tok / max(now - t_last, 1e-9)
        alpha, gates = _gates(model)
        record = {"step": step, "loss": final_loss, "lr": lr, "tok_per_s": tok_s, "alpha_l2": alpha,
                  "gates": gates}
        line = (f"step {step}/{cfg.steps} loss {final_loss:.3f} lr {lr:.1e} tok/s {tok_s:,.0f} "
                f"alpha_l2 {alpha:.4f}")
        if evaluated and (held := evaluate()) is not None:
            record["heldout_loss"] = held["nats_per_token"]
            record["heldout_bpb"] = _finite(held["bits_per_byte"])
            line += f" heldout {held['nats_per_token']:.3f}"
        log(line)
        with metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        loss_sum.zero_()
        n_loss, n_tok, t_last = 0, 0, time.perf_counter()  # eval time is not counted in tok/s

    alpha, gates = _gates(model)
    summary = {"final_loss": _finite(final_loss),
               "final_heldout_loss": held["nats_per_token"] if held else None,
               "final_heldout_bpb": _finite(held["bits_per_byte"]) if held else None,
               "alpha_l2": alpha, "gates": gates, "train_config": asdict(cfg)}
    meta = save_model(model, out_dir, summary)
    elapsed = time.perf_counter() - (t_start or time.perf_counter())
    steps_timed = max(cfg.steps - 1, 1)
    # wall-clock figures are returned (and in metrics.jsonl) but never written into model files
    return {**meta, "timing": {"seconds_after_first_step": elapsed, "sec_per_step": elapsed / steps_timed}}
