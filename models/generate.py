"""Batched generation with a KV cache: greedy or seeded sampling, dynamic or fixed shapes.

Prompts of different lengths are left-padded; the cache's padding mask and per-row RoPE
positions make every row decode exactly as it would alone (tested against full recomputation).
Prompts are sorted by length before batching so rows of similar length share a batch.

Sampling is reproducible per row, not per batch: row i draws its noise from its own generator
seeded by (seed, i), so a response does not depend on the batch size, on which rows share its
batch, or on the arm (MARS and ABLATED see the same noise for the same row: common random
numbers make the paired comparison less noisy). A draw is the Gumbel-max trick,
argmax(logits / T + Gumbel), which is exactly a sample from softmax(logits / T) (top-k masked).

`fixed_shape=True` is for XLA (and torch.compile): every batch is padded to `batch_size` rows
and one prompt length, the cache attends over its whole buffer, and every step runs (no
data-dependent early stop), so the prefill and the step each compile once.

`steer` (the STEER arm, models.steer_hook) adds a per-prompt vector to one block's output while a
batch generates; padding rows of a fixed-shape batch get a zero vector.

Device and precision: generation runs where the model's weights are; a `runtime` (`eval_runtime`, the
same models.distributed.Runtime the trainer uses) adds its autocast: bf16 on accelerators, none on CPU,
so CPU outputs are the plain fp32 ones. The KV cache then holds bf16 keys/values, and the logits are
picked in fp32.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from models.distributed import Kind, Runtime, resolve_kind
from models.steer_hook import Steering, add_to_residual


@dataclass(frozen=True)
class Sampling:
    """temperature 0 is greedy; top_k keeps the k most likely tokens before sampling."""

    temperature: float = 0.0
    top_k: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


GREEDY = Sampling()


def eval_kind(device: str = "auto", train_device: str = "auto") -> Kind:
    """The device kind evaluation runs on. 'auto': the training device's kind when this machine has it
    (XLA: torch_xla importable; CUDA: a visible GPU), else CUDA when visible, else CPU. An explicit
    device this machine lacks is an error naming the field, raised before any work."""
    if device == "auto":
        kind = resolve_kind(train_device)
        return kind if _available(kind) else resolve_kind("auto")
    kind = resolve_kind(device)
    if not _available(kind):
        need = "a CUDA device torch can see" if kind == "cuda" else "torch_xla installed (a TPU/XLA host)"
        raise ValueError(f"eval.device: {kind!r} needs {need}; set eval.device to auto or cpu")
    return kind


def _available(kind: Kind) -> bool:
    if kind == "cuda":
        return torch.cuda.is_available()
    if kind == "xla":
        return importlib.util.find_spec("torch_xla") is not None
    return True


def eval_runtime(kind: Kind, precision: str = "auto") -> Runtime:
    """A one-process Runtime on `kind` for evaluation: its device, and bf16 autocast on accelerators
    (precision 'auto'; 'fp32' turns it off, 'bf16' forces it, CPU included)."""
    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"precision {precision!r}: expected auto, fp32 or bf16")
    bf16 = precision == "bf16" or (precision == "auto" and kind != "cpu")
    if kind == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    elif kind == "xla":
        import torch_xla

        device = torch_xla.device()
    else:
        device = torch.device("cpu")
    return Runtime(kind, device, bf16=bf16)


@torch.no_grad()
def generate(model: nn.Module, prompts: list[list[int]], channels: Tensor | None, max_new_tokens: int,
             eos_id: int, pad_id: int, batch_size: int = 32, *, sampling: Sampling = GREEDY,
             fixed_shape: bool = False, use_cache: bool = True, prompt_len: int | None = None,
             steer: Steering | None = None, runtime: Runtime | None = None,
             on_batch: Callable[[int], None] | None = None) -> list[list[int]]:
    """Continuations (new tokens only, eos excluded), in the order of `prompts`.

    `channels` is [N, C, D] aligned with prompts, or None (zeros: the ablated state).
    `use_cache=False` recomputes the whole sequence every step (the benchmark's reference).
    `prompt_len` (fixed shape only) pads every prompt to this length; default: the longest prompt.
    `steer` adds its vector i to the residual stream of prompt i at every position (STEER arm).
    `runtime` (eval_runtime) supplies the autocast; the model must already be on its device.
    `on_batch(n)` is called after each batch with the number of prompts it answered (progress).
    """
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (e.g. bos)")
    if channels is not None and len(channels) != len(prompts):
        raise ValueError(f"{len(channels)} channel rows for {len(prompts)} prompts")
    if steer is not None and len(steer.vectors) != len(prompts):
        raise ValueError(f"{len(steer.vectors)} steering vectors for {len(prompts)} prompts")
    longest = max((len(p) for p in prompts), default=0)
    if prompt_len is not None and prompt_len < longest:
        raise ValueError(f"prompt_len {prompt_len} is shorter than the longest prompt ({longest} tokens)")
    device = next(model.parameters()).device
    if runtime is not None and runtime.device.type != device.type:
        raise ValueError(f"the model is on {device} but the runtime on {runtime.device}; "
                         f"move it first: model.to(runtime.device)")
    was_training = model.training
    model.eval()
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        ch = channels[rows].to(device) if channels is not None else None
        batch = _Batch(rows, [prompts[i] for i in rows], ch, batch_size if fixed_shape else len(rows),
                       (prompt_len or longest) if fixed_shape else max(len(prompts[i]) for i in rows), pad_id)
        hook = nullcontext() if steer is None else \
            add_to_residual(model, steer.layer, steer.batch(rows, batch.idx.size(0)).to(device))
        with hook, runtime.autocast() if runtime is not None else nullcontext():
            new = _generate_batch(model, batch, max_new_tokens, eos_id, device, sampling, fixed_shape, use_cache)
        for i, tokens in zip(rows, new, strict=True):
            out[i] = tokens
        if on_batch is not None:
            on_batch(len(rows))
    model.train(was_training)
    return out


class _Batch:
    """Left-padded token ids [B, L], their real-token mask, the row ids and the channels (padded rows: zeros)."""

    def __init__(self, rows: list[int], prompts: list[list[int]], channels: Tensor | None, size: int,
                 length: int, pad_id: int):
        self.rows = rows
        self.idx = torch.full((size, length), pad_id, dtype=torch.long)
        self.valid = torch.zeros(size, length, dtype=torch.bool)
        for b, p in enumerate(prompts):
            self.idx[b, length - len(p):] = torch.tensor(p, dtype=torch.long)
            self.valid[b, length - len(p):] = True
        if channels is not None and size > len(rows):
            channels = torch.cat([channels, channels.new_zeros(size - len(rows), *channels.shape[1:])])
        self.channels = channels


class _Picker:
    """Greedy argmax, or a Gumbel-max sample with one generator per real row (padding rows get no noise)."""

    def __init__(self, sampling: Sampling, rows: list[int], size: int):
        self.sampling = sampling
        self.size = size
        self.gens = [] if sampling.greedy else [
            torch.Generator().manual_seed(sampling.seed * 1_000_003 + i) for i in rows]

    def __call__(self, logits: Tensor) -> Tensor:
        if self.sampling.greedy:
            return logits.argmax(dim=-1)
        s = self.sampling
        scaled = logits.float() / s.temperature
        if s.top_k is not None and s.top_k < scaled.size(-1):
            kth = scaled.topk(s.top_k, dim=-1).values[:, -1:]
            scaled = scaled.masked_fill(scaled < kth, float("-inf"))
        noise = torch.zeros(self.size, scaled.size(-1))
        for b, g in enumerate(self.gens):
            noise[b] = -torch.log(-torch.log(torch.rand(scaled.size(-1), generator=g)))
        return (scaled + noise.to(scaled.device)).argmax(dim=-1)


def _sync(device: torch.device) -> None:
    """XLA runs lazily: cut the graph once per step so every step is the same compiled program."""
    if device.type == "xla":
        import torch_xla

        torch_xla.sync()


def _generate_batch(model: nn.Module, batch: _Batch, max_new_tokens: int, eos_id: int, device: torch.device,
                    sampling: Sampling, fixed: bool, use_cache: bool) -> list[list[int]]:
    if max_new_tokens <= 0:
        return [[] for _ in batch.rows]
    B, L = batch.idx.shape
    idx, valid, channels = batch.idx.to(device), batch.valid.to(device), batch.channels
    pick = _Picker(sampling, batch.rows, B)
    cache = model.new_cache(B, L + max_new_tokens, fixed=fixed) if use_cache else None
    logits = _logits(model, idx, valid, channels, cache)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    steps: list[Tensor] = []
    for t in range(max_new_tokens):
        nxt = pick(logits)
        steps.append(nxt)
        if t == max_new_tokens - 1:
            break
        if not fixed:  # a data-dependent stop would force a host sync and a second graph under XLA
            done |= nxt == eos_id
            if bool(done.all()):
                break
        if cache is not None:
            logits = model.decode(nxt[:, None], cache)[:, -1]  # finished rows keep going; cut below
        else:
            idx = torch.cat([idx, nxt[:, None]], dim=1)
            valid = torch.cat([valid, valid.new_ones(B, 1)], dim=1)
            logits = _logits(model, idx, valid, channels, None)
        _sync(device)
    result = []
    for row in torch.stack(steps, dim=1)[: len(batch.rows)].tolist():  # padding rows (fixed shape) are dropped
        result.append(row[: row.index(eos_id)] if eos_id in row else row)
    return result


def _logits(model: nn.Module, idx: Tensor, valid: Tensor, channels: Tensor | None, cache) -> Tensor:
    """Last-position logits: through the running cache, or (no cache) a full recompute in a fresh one."""
    if cache is None:
        cache = model.new_cache(idx.size(0), idx.size(1))
    return model.decode(idx, cache, channels, valid)[:, -1]
