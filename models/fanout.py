"""Fan-out: which models train at the same time, and on which devices (pure: no torch, no Prefect).

With several accelerators, the native and its baselines need not queue for the whole machine: the
visible devices are split into equal groups, one per concurrent trainer, and each trainer process
sees only its group (CUDA_VISIBLE_DEVICES). The iteration flow submits one train task per model
through Prefect's task runner and gives model i the slot i mod (number of slots), after the model
before it on that slot (tasks.train.trainer_slots reads the machine; flows.iteration submits).

Groups are equal so that every model trains with the same number of ranks; leftovers stay unused
(8 GPUs, 3 models: three groups of 2, two GPUs idle), which keeps each group's DDP world a divisor
of the batch. On CPU the cores are shared, so `auto` never fans out there; an int forces it and each
trainer gets its share of the cores (OMP_NUM_THREADS). XLA chips are not split between trainers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

THREADS_ENV = "OMP_NUM_THREADS"
CUDA_ENV = "CUDA_VISIBLE_DEVICES"


@dataclass(frozen=True)
class TrainerSlot:
    """One concurrent trainer's share of the machine: its processes and the environment that confines it."""

    nproc: int
    env: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in sorted(self.env.items()))


def largest_group(limit: int, batch_size: int, grad_accum: int) -> int:
    """The largest group size <= limit whose ranks split the global batch evenly (1 always does)."""
    return next(g for g in range(limit, 0, -1) if batch_size % (grad_accum * g) == 0)


def plan_slots(models: int, kind: str, parallel_models: int | Literal["auto"], devices: int | Literal["auto"],
               visible: Sequence[str], cores: int, batch_size: int, grad_accum: int) -> list[TrainerSlot]:
    """The slots `models` trainers share; [] means no fan-out (one model at a time, as `train.devices` says).

    `kind`: the resolved train device kind; `visible`: the accelerator ids this process may use (in order);
    `cores`: the CPU cores it may use. auto fans out only on >= 2 visible GPUs with `devices: auto`; an int
    forces that many concurrent trainers (never more than there are models).
    """
    if models < 2 or parallel_models == 1 or (parallel_models == "auto" and kind != "cuda"):
        return []
    if kind == "xla":
        raise ValueError(f"train.parallel_models: {parallel_models} concurrent trainers on XLA is not supported "
                         "(one trainer uses every chip); set train.parallel_models: auto or 1")
    if kind == "cpu":
        count = min(int(parallel_models), models)
        nproc = devices if isinstance(devices, int) else 1
        threads = str(max(1, cores // (count * nproc)))
        return [TrainerSlot(nproc, {THREADS_ENV: threads}) for _ in range(count)]
    if parallel_models == "auto":
        if devices != "auto" or len(visible) < 2:
            return []
        count = min(models, len(visible))
    else:
        count = min(parallel_models, models)
    size = devices if isinstance(devices, int) else len(visible) // count
    if size < 1 or count * size > len(visible):
        per = f"{devices} device(s) each (train.devices)" if isinstance(devices, int) else "one device each at least"
        raise ValueError(f"train.parallel_models: {count} concurrent trainers with {per} need "
                         f"{count * max(size, 1)} devices, but {len(visible)} are visible; lower "
                         "train.parallel_models or train.devices, or use auto")
    if devices == "auto":
        size = largest_group(size, batch_size, grad_accum)
    threads = str(max(1, cores // (count * size)))
    return [TrainerSlot(size, {CUDA_ENV: ",".join(visible[i * size:(i + 1) * size]), THREADS_ENV: threads})
            for i in range(count)]
