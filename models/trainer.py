"""One training loop for CPU, CUDA (one GPU or torchrun DDP) and TPU/XLA, with exact resume.

The same loop trains the native model, its baselines and the adapters, so any gap between them
comes from the architecture, not from the recipe: AdamW with decay groups, warmup then cosine or
linear decay, gradient clipping, gradient accumulation, channel dropout with its own warmup,
bf16 autocast on accelerators (`models.distributed` hides the device differences).

Data: with `packing` (the default) a batch is `batch_size` windows of seq_len positions, each holding
whole rows end to end (models.data: attention, positions and channels stay inside each row), so
~95-99% of the positions are real tokens instead of the ~4-30% a padded row gives. Models that
cannot read windows (the adapter: its frozen base may be a Hugging Face model, whose attention
takes no per-row mask from us) and `packing: false` train one row per sequence, padded, with
batch_size = rows. The loss covers target tokens only and the head runs only at them
(`return_logits=False`). tokens/s and MFU count real tokens (positions holding a row's token), not
padding, whichever layout: the two are comparable.

Loss normalisation: a micro-batch contributes (sum of its target-token CE) / (target tokens in
the whole global batch), times the number of ranks (DDP and XLA average gradients over ranks).
The gradient is then exactly that of the global batch's mean loss whatever the split over devices
and accumulation steps: 2 processes train like 1 with the same global batch, up to float rounding.

Randomness is a pure function of (seed, step): the batch (models.data.TrainBatches), the channel
dropout mask and the dropout seed are derived per step, so resuming at step s needs only s, and
a checkpoint (weights, optimizer, step, loss accumulators, metrics, best so far) continues bit-exactly.

Best weights: each held-out eval (on the existing schedule, no extra ones) that lowers the held-out loss
below the best so far keeps a CPU copy of the weights; they are saved as `out_dir/best/` (a model folder
of its own, models.checkpoint.BEST) beside the last weights, and the summary names `best_step` and
`best_heldout_loss`. The best so far travels in every checkpoint, so a resumed run ends with the same best.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.architectures import build_info
from models.checkpoint import BEST, checkpoint_files, latest_checkpoint, save_model, write_checkpoint
from models.data import PackedRows, ReplayWindows, TrainBatches, eval_batches, shard_rows
from models.distributed import Runtime, setup
from models.gpt import Window
from tinymars.artifacts import hash_json
from tinymars.profile import TrainRecipe

__all__ = ["train", "heldout_loss", "lr_at", "param_groups", "reads_windows"]

# Recipe settings that change nothing a resumed run computes: left out of the checkpoint fingerprint.
RESUME_NEUTRAL = {"log_every", "eval_every", "checkpoint_every", "keep_checkpoints", "device"}


def lr_at(step: int, cfg: TrainRecipe) -> float:
    """Linear warmup over warmup_steps, then cosine (or linear) from lr down to lr * min_lr_frac. 0-based."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1.0 - progress
    return cfg.lr * (cfg.min_lr_frac + (1.0 - cfg.min_lr_frac) * shape)


def channel_dropout_at(step: int, cfg: TrainRecipe) -> float:
    """Dropout probability ramps from 0 to channel_dropout, so gates can first find the signal."""
    ramp = cfg.warmup_steps if cfg.channel_dropout_warmup is None else cfg.channel_dropout_warmup
    if ramp <= 0:
        return cfg.channel_dropout
    return cfg.channel_dropout * min(1.0, step / ramp)


def reads_windows(model: nn.Module) -> bool:
    """Whether `model` reads packed windows (`window=`) and returns the loss alone (`return_logits=False`)."""
    return bool(getattr(model, "packs_rows", False))


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])


def channel_keep(rows: int | tuple[int, ...], channels: int, p: float, seed: int, step: int) -> Tensor | None:
    """[*rows, C] keep mask of the global batch: drop whole channels per row with probability p.

    `rows` is the batch's row axes: (B,) for one row per sequence, (B, R) for windows of R row slots.
    Drawn for the whole global batch on every rank, so a row's mask does not depend on the rank count.
    """
    if p <= 0.0 or channels == 0:
        return None
    gen = torch.Generator().manual_seed(step_seed(seed, step, 1 << 20))
    shape = (rows,) if isinstance(rows, int) else tuple(rows)
    return (torch.rand(*shape, channels, generator=gen) >= p).float()


def param_groups(model: nn.Module, cfg: TrainRecipe) -> list[dict[str, Any]]:
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


def token_ce_sum(logits: Tensor, targets: Tensor, loss_mask: Tensor) -> Tensor:
    """Sum of next-token CE over loss_mask == 1 positions (float32)."""
    ce = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none")
    return (ce * loss_mask.flatten().to(ce.dtype)).sum()


@torch.no_grad()
def heldout_loss(model: nn.Module, rows: PackedRows, batch_size: int, seq_len: int, pad_id: int,
                 zero_channels: bool = False, *, runtime: Runtime | None = None,
                 packed: bool | None = None) -> dict[str, float]:
    """Target-token loss over a split; bits_per_byte = total nats / ln 2 / total target bytes.

    Every row is scored whole, alone in its sequence or (`packed`, the default for models that read
    windows) in windows of whole rows where nothing crosses a row: the same numbers up to float
    rounding, for a fraction of the positions. batch_size is sequences (windows or rows) per forward.
    With a multi-rank runtime each rank scores every world-th row and the totals are summed; on
    XLA the last batch is padded to full size (one graph) and totals stay on the device until the end.
    """
    rt = runtime
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    packed = reads_windows(model) if packed is None else packed
    if packed and not reads_windows(model):
        raise ValueError(f"{type(model).__name__} does not read packed windows; score it with packed=False")
    if rt is not None and rt.world > 1:
        rows = rows.subset(range(rt.rank, len(rows), rt.world))
    xla = device.type == "xla"
    acc = torch.zeros(3, dtype=torch.float32 if xla else torch.float64, device=device)  # nats, tokens, bytes
    for b in eval_batches(rows, batch_size, seq_len, pad_id, fixed_shape=xla, packed=packed):
        b = {k: t.to(device) for k, t in b.items()}
        channels = torch.zeros_like(b["channels"]) if zero_channels else b["channels"]
        mask = b["loss_mask"]
        with rt.autocast() if rt is not None else contextlib.nullcontext():
            if reads_windows(model):  # the head runs at target positions only
                _, mean = model(b["idx"], channels, b["targets"], mask, window=Window.of(b), return_logits=False)
                nats = mean.to(acc.dtype) * mask.sum().to(acc.dtype)
            else:
                logits, _ = model(b["idx"], channels)
                ce = F.cross_entropy(logits.flatten(0, 1).float(), b["targets"].flatten(), reduction="none")
                nats = (ce.to(acc.dtype) * mask.flatten().to(acc.dtype)).sum()
        acc += torch.stack([nats, mask.sum().to(acc.dtype), b["target_bytes"].sum().to(acc.dtype)])
    if rt is not None:
        acc = rt.sum(acc)
    total, tokens, nbytes = acc.double().cpu().tolist()
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


def fingerprint(model: nn.Module, cfg: TrainRecipe, rows: PackedRows) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: the model build, the recipe and the training rows."""
    recipe = cfg.model_dump(mode="json", exclude=RESUME_NEUTRAL)
    return {"model": build_info(model), "train": recipe, "data": {"rows": len(rows), "row_ids": hash_json(rows.row_id)}}


def train(model: nn.Module, train_rows: PackedRows, heldout_rows: PackedRows | None, cfg: TrainRecipe,
          out_dir: Path, pad_id: int, log: Callable[[str], None] = print, *, runtime: Runtime | None = None,
          ckpt_dir: Path | None = None, resume: bool = False, time_budget_s: float = 0.0,
          eval_every_s: float = 0.0, replay: ReplayWindows | None = None, replay_share: float = 0.0
          ) -> dict[str, Any]:
    """Train in place; write metrics.jsonl, model.safetensors, model.json (and best/, the weights of the lowest
    held-out loss) to out_dir; return the summary.

    `runtime` is the process's device/rank (default: a single process on `cfg.device`). With
    `ckpt_dir`, checkpoints are written every `cfg.checkpoint_every` steps; with `resume`, training
    continues from the newest checkpoint there that verifies and matches this run.

    Time-boxed runs (the architecture benchmark) stop once `time_budget_s` seconds were spent training
    (held-out evals not counted) and evaluate every `eval_every_s` training seconds; 0 = off. They are
    arguments, not recipe fields: they bound one run and are no setting of how a model trains.
    metrics.jsonl then has `train_s`.

    `replay` (models.data.ReplayWindows) fills `replay_share` of the training windows with language-model
    replay; the rest are packed windows of `train_rows`.
    """
    rt = runtime or setup(cfg.device, cfg.precision)
    try:
        loop = _Loop(model, train_rows, heldout_rows, cfg, Path(out_dir), pad_id, log, rt, ckpt_dir,
                     replay, replay_share)
        return loop.run(resume, time_budget_s, eval_every_s)
    finally:
        if runtime is None:
            rt.close()


class _Loop:
    def __init__(self, model: nn.Module, rows: PackedRows, heldout: PackedRows | None, cfg: TrainRecipe,
                 out_dir: Path, pad_id: int, log: Callable[[str], None], rt: Runtime, ckpt_dir: Path | None,
                 replay: ReplayWindows | None = None, replay_share: float = 0.0):
        if cfg.batch_size % (cfg.grad_accum * rt.world):
            raise ValueError(f"batch_size {cfg.batch_size} must be divisible by grad_accum x devices "
                             f"= {cfg.grad_accum} x {rt.world}")
        self.model, self.rows, self.heldout, self.cfg, self.rt = model, rows, heldout, cfg, rt
        self.out_dir, self.pad_id, self.ckpt_dir = out_dir, pad_id, ckpt_dir
        self.log = log if rt.is_main else (lambda _: None)
        self.seq_len = build_info(model)["seq_len"]
        self.micro = cfg.batch_size // (cfg.grad_accum * rt.world)
        self.packed = cfg.packing and reads_windows(model)
        if cfg.packing and not self.packed:
            self.log(f"{type(model).__name__} does not read packed windows: one row per sequence "
                     f"(batch_size {cfg.batch_size} = rows)")
        self.batches = TrainBatches(rows, self.seq_len, pad_id, cfg.seed, self.packed, replay, replay_share)
        self.metrics = out_dir / "metrics.jsonl"
        model.to(rt.device).train()
        fused = rt.kind == "cuda"
        self.opt = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8, fused=fused)
        self.wrapped = rt.wrap(model)
        self.forward = self.wrapped
        if cfg.compile and rt.kind != "xla":  # not fullgraph: the target-only head runs eagerly after the graph
            self.forward = torch.compile(self.wrapped, dynamic=False)
        flops = model.flops_per_token() if hasattr(model, "flops_per_token") else None
        peak = rt.peak_flops()
        self.flops_ratio = flops / peak if flops and peak else None  # MFU = tokens/s * this

    # ---- one optimizer step -----------------------------------------------------------------------
    def step(self, i: int, loss_acc: Tensor) -> tuple[float, int]:
        """Run 0-based step i (accumulating its mean loss into loss_acc); returns its learning rate and the
        real tokens (non-padding positions) of its global batch."""
        cfg, rt, dev = self.cfg, self.rt, self.rt.device
        rt.seed(step_seed(cfg.seed, i, rt.rank))
        lr = lr_at(i, cfg)
        for g in self.opt.param_groups:
            g["lr"] = lr * g["lr_mult"]
        units = self.batches.units(i, cfg.batch_size)
        slots = (len(units),) if self.batches.slots is None else (len(units), self.batches.slots)
        keep = channel_keep(slots, self.rows.channels.shape[1], channel_dropout_at(i, cfg), cfg.seed, i)
        denom = float(max(1, self.batches.loss_tokens(units)))
        order = np.arange(len(units))
        for a in range(cfg.grad_accum):
            mine = shard_rows(order, cfg.grad_accum, rt.world, rt.rank, a)
            b = self.batches.make([units[j] for j in mine])
            b["channels"] = b["channels"] if keep is None else b["channels"] * keep[mine][..., None]
            pin = rt.kind == "cuda"
            b = {k: t.pin_memory().to(dev, non_blocking=True) if pin else t.to(dev) for k, t in b.items()}
            with rt.no_sync(self.wrapped, a < cfg.grad_accum - 1):
                with rt.autocast():
                    ce_sum = self.target_ce_sum(b)
                (ce_sum * (rt.world / denom)).backward()
            loss_acc += ce_sum.detach() / denom
        rt.reduce_gradients(self.opt)
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        rt.step_done()
        return lr, self.batches.real_tokens(units)

    def target_ce_sum(self, b: dict[str, Tensor]) -> Tensor:
        """Sum of the CE over this micro-batch's target tokens: a model that reads windows returns the mean
        from its target-only head (times the count gives the sum); the adapter returns full logits."""
        if reads_windows(self.model):
            _, mean = self.forward(b["idx"], b["channels"], b["targets"], b["loss_mask"], window=Window.of(b),
                                   return_logits=False)
            return mean * b["loss_mask"].sum()
        logits, _ = self.forward(b["idx"], b["channels"])
        return token_ce_sum(logits, b["targets"], b["loss_mask"])

    def evaluate(self) -> dict[str, float] | None:
        if self.heldout is None or len(self.heldout) == 0:
            return None
        return heldout_loss(self.model, self.heldout, self.micro, self.seq_len, self.pad_id, runtime=self.rt,
                            packed=self.packed)

    # ---- best weights -------------------------------------------------------------------------------
    def note_eval(self, step: int, loss: float) -> None:
        """Keep the weights when this eval's held-out loss beats the best so far (every rank decides alike:
        the loss is summed over ranks; only the main rank, which writes, holds the copy)."""
        if not math.isfinite(loss) or (self.best is not None and loss >= self.best["heldout_loss"]):
            return
        self.best = {"step": step, "heldout_loss": loss}
        if self.rt.is_main:  # a copy, never a view: training goes on changing the live weights
            self.best_state = {k: v.detach().to("cpu", copy=True).contiguous()
                               for k, v in self.model.state_dict().items()}

    def save_best(self, summary: dict[str, Any]) -> None:
        """Write the best weights as `out_dir/best/` (main rank), with the step and loss they were kept at."""
        if self.best is None or not self.rt.is_main:
            return
        extra = {"weights": "best", "best_step": self.best["step"], "best_heldout_loss": self.best["heldout_loss"],
                 "train_config": summary["train_config"]}
        save_model(self.model, self.out_dir / BEST, extra, state=self.best_state)

    # ---- checkpoints --------------------------------------------------------------------------------
    def save_checkpoint(self, step: int, loss_acc: Tensor, n_acc: int) -> None:
        total = self.rt.sum(loss_acc)  # every rank's share of the pending log window
        if self.rt.is_main:
            state = {"step": step, "loss_acc": total, "n_acc": n_acc, "world": self.rt.world, "best": self.best,
                     "rng": {"scheme": "derived per step from (seed, step, rank)", "seed": self.cfg.seed}}
            files = checkpoint_files(self.model, self.opt, state, self.metrics.read_text(), self.best_state)
            path = write_checkpoint(self.ckpt_dir, step, files, self.fp, self.cfg.keep_checkpoints)
            self.log(f"checkpoint step {step} -> {path}")
        self.rt.barrier("checkpoint")

    def restore(self, loss_acc: Tensor) -> tuple[int, int]:
        ckpt = latest_checkpoint(self.ckpt_dir, self.fp, warn=self.log)
        if ckpt is None:
            return 0, 0
        ckpt.load_model_state(self.model)
        self.opt.load_state_dict(ckpt.optimizer_state())
        state = ckpt.trainer_state()
        self.best = state.get("best")
        if self.rt.is_main:  # the saved accumulator is the sum over ranks: one rank carries it
            loss_acc.copy_(state["loss_acc"].to(loss_acc.device))
            self.metrics.write_text(ckpt.metrics_text())
            self.best_state = ckpt.best_state()
        self.log(f"resumed from {ckpt.path} at step {ckpt.step}")
        return ckpt.step, int(state["n_acc"])

    # ---- the loop -----------------------------------------------------------------------------------
    def run(self, resume: bool, time_budget_s: float = 0.0, eval_every_s: float = 0.0) -> dict[str, Any]:
        cfg, rt = self.cfg, self.rt
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.fp = fingerprint(self.model, cfg, self.rows)
        self.best: dict[str, Any] | None = None  # {"step", "heldout_loss"} of the best eval so far
        self.best_state: dict[str, Tensor] | None = None
        if rt.is_main:
            self.metrics.write_text("")
        loss_acc = torch.zeros((), device=rt.device)
        start, n_acc = self.restore(loss_acc) if resume and self.ckpt_dir is not None else (0, 0)
        n_tok, t_last, t_start, real_tokens, timed_tokens = 0, time.perf_counter(), None, 0, 0
        final_loss, held = float("nan"), None
        timed = time_budget_s > 0 or eval_every_s > 0
        t_begin, eval_s, next_eval_s, last = time.perf_counter(), 0.0, eval_every_s, start
        for step in range(start + 1, cfg.steps + 1):
            lr, tokens = self.step(step - 1, loss_acc)
            n_acc += 1
            n_tok += tokens  # real tokens, not padding
            real_tokens += tokens
            timed_tokens += tokens if t_start is not None else 0
            last = step
            t_start = t_start or time.perf_counter()  # first step (compile, warm-up) is not timed
            train_s = time.perf_counter() - t_begin - eval_s
            out_of_time = 0 < time_budget_s <= train_s
            eval_due = 0 < next_eval_s <= train_s
            if timed and rt.world > 1:  # clocks differ across ranks: all must evaluate and stop at the same step
                flags = rt.sum(torch.tensor([float(out_of_time), float(eval_due)], device=rt.device))
                out_of_time, eval_due = bool(flags[0] > 0), bool(flags[1] > 0)
            evaluated = step % cfg.eval_every == 0 or step == cfg.steps or out_of_time or eval_due
            if step % cfg.log_every == 0 or evaluated:
                final_loss = float(rt.sum(loss_acc)) / n_acc  # mean train loss since the last line
                tok_s = n_tok / max(time.perf_counter() - t_last, 1e-9)  # before the eval: it is not training
                t_eval = time.perf_counter()
                held = self.evaluate() if evaluated else None
                if held is not None:
                    self.note_eval(step, held["nats_per_token"])
                eval_s += time.perf_counter() - t_eval
                if eval_due:  # the next multiple of eval_every_s after now
                    next_eval_s = (train_s // eval_every_s + 1) * eval_every_s
                self.write_metrics(step, lr, final_loss, tok_s, held, train_s if timed else None)
                loss_acc.zero_()
                n_acc, n_tok, t_last = 0, 0, time.perf_counter()  # eval time is not counted in tok/s
            if out_of_time:
                self.log(f"time budget {time_budget_s:g}s reached after step {step} ({train_s:.1f}s training)")
                break
            if self.ckpt_dir is not None and cfg.checkpoint_every and step % cfg.checkpoint_every == 0 \
                    and step < cfg.steps:
                self.save_checkpoint(step, loss_acc, n_acc)
        alpha, gates = _gates(self.model)
        summary = {"final_loss": _finite(final_loss),
                   "final_heldout_loss": held["nats_per_token"] if held else None,
                   "final_heldout_bpb": _finite(held["bits_per_byte"]) if held else None,
                   "alpha_l2": alpha, "gates": gates, "train_config": cfg.model_dump(mode="json"),
                   "best_step": self.best["step"] if self.best else None,
                   "best_heldout_loss": self.best["heldout_loss"] if self.best else None}
        self.save_best(summary)
        meta = save_model(self.model, self.out_dir, summary) if rt.is_main else summary
        rt.barrier("saved")
        elapsed = time.perf_counter() - (t_start or time.perf_counter())
        steps_timed = max(last - start - 1, 1)
        # wall-clock figures are returned (and in metrics.jsonl) but never written into model files
        return {**meta, "timing": {"seconds_after_first_step": elapsed, "sec_per_step": elapsed / steps_timed,
                                   "steps": last, "real_tokens": real_tokens, "packed": self.packed,
                                   "tok_per_s": timed_tokens / elapsed if elapsed > 0 else None,
                                   "devices": rt.world, "device": rt.device_name, "resumed_at": start}}

    def write_metrics(self, step: int, lr: float, loss: float, tok_s: float, held: dict[str, float] | None,
                      train_s: float | None = None) -> None:
        alpha, gates = _gates(self.model)
        record: dict[str, Any] = {"step": step, "loss": loss, "lr": lr, "tok_per_s": tok_s, "alpha_l2": alpha,
                                  "gates": gates}
        if train_s is not None:
            record["train_s"] = train_s
        line = f"step {step}/{self.cfg.steps} loss {loss:.3f} lr {lr:.1e} tok/s {tok_s:,.0f} alpha_l2 {alpha:.4f}"
        if self.flops_ratio is not None:
            record["mfu"] = tok_s * self.flops_ratio
            line += f" mfu {record['mfu']:.1%}"
        if held is not None:
            record["heldout_loss"] = held["nats_per_token"]
            record["heldout_bpb"] = _finite(held["bits_per_byte"])
            line += f" heldout {held['nats_per_token']:.3f}"
        if self.rt.is_main:
            with self.metrics.open("a") as f:
                f.write(json.dumps(record) + "\n")
        self.log(line)
