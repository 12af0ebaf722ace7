"""Where a training process runs: CPU, one or many CUDA GPUs (torchrun), or TPU/XLA devices (PJRT).

The trainer asks a `Runtime` for the device, its rank in the job, a bf16 autocast context, and the
few collectives it needs (sum a scalar, average gradients, wait for everyone). Everything
device-specific lives here, so the training loop is one loop for every kind of machine.

- torchrun sets RANK / WORLD_SIZE / LOCAL_RANK: CUDA uses NCCL, CPU uses gloo, and the model is
  wrapped in DistributedDataParallel (which averages gradients during backward).
- XLA (torch_xla, PJRT): one process per device, started by `torch_xla.launch`; the graph is cut
  with `torch_xla.sync()` once per optimizer step and gradients are averaged with
  `xm.reduce_gradients` (DDP is not used on XLA).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

Kind = Literal["cpu", "cuda", "xla"]

# Dense bf16 peak FLOP/s per device, matched against the device name; MFU is reported only for these.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("GH200", 989e12), ("B200", 2250e12),
    ("A100", 312e12), ("L40S", 362e12), ("L4", 121e12), ("A10G", 70e12), ("RTX 4090", 165e12),
    ("v6e", 918e12), ("v5p", 459e12), ("v5litepod", 197e12), ("v5e", 197e12), ("v4", 275e12),
)


def resolve_device(device: str) -> str:
    """The one device resolver: 'auto' is CUDA when visible, else CPU (XLA only when asked for: it needs
    torch_xla); anything else (cpu, cuda, cuda:1, ...) is taken as given."""
    if device != "auto":
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_kind(device: str) -> Kind:
    """The training device kind: `resolve_device`, limited to the kinds the trainer runs on."""
    device = resolve_device(device)
    if device not in ("cpu", "cuda", "xla"):
        raise ValueError(f"device {device!r}: expected auto, cpu, cuda or xla")
    return device  # type: ignore[return-value]


def default_nproc(device: str) -> int:
    """How many training processes `devices: auto` means: every visible GPU, else one."""
    return max(1, torch.cuda.device_count()) if resolve_kind(device) == "cuda" else 1


def visible_accelerators(kind: str) -> list[str]:
    """The ids of the GPUs this process may use, in order (what a child's CUDA_VISIBLE_DEVICES may name):
    the parent's CUDA_VISIBLE_DEVICES when set, else 0..count-1; [] for other kinds (models.fanout)."""
    if kind != "cuda" or not torch.cuda.is_available():
        return []
    count = torch.cuda.device_count()
    given = os.environ.get("CUDA_VISIBLE_DEVICES")
    if given is None:
        return [str(i) for i in range(count)]
    return [d.strip() for d in given.split(",") if d.strip()][:count]


def cpu_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def peak_flops(name: str) -> float | None:
    for key, flops in PEAK_BF16_FLOPS:
        if key.lower() in name.lower():
            return flops
    return None


def die_with_parent() -> None:
    """Linux: get SIGKILL when the parent dies, so a killed task never leaves a trainer running."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


@dataclass
class Runtime:
    kind: Kind
    device: torch.device
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    bf16: bool = False
    owns_group: bool = False  # we initialised torch.distributed and must tear it down

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device_name(self) -> str:
        if self.kind == "cuda":
            return torch.cuda.get_device_name(self.device)
        if self.kind == "xla":
            return os.environ.get("TPU_ACCELERATOR_TYPE") or os.environ.get("ACCELERATOR_TYPE") or "xla"
        return "cpu"

    def peak_flops(self) -> float | None:
        """Peak bf16 FLOP/s of the whole job (all ranks), or None where unknown (CPU, fp32)."""
        one = peak_flops(self.device_name) if self.bf16 else None
        return one * self.world if one else None

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.kind, dtype=torch.bfloat16)

    def wrap(self, model: nn.Module) -> nn.Module:
        """DDP for multi-process CPU/CUDA; XLA and single processes train the module itself."""
        if self.world == 1 or self.kind == "xla":
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.kind == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def no_sync(self, wrapped: nn.Module, skip: bool) -> contextlib.AbstractContextManager[Any]:
        """Skip DDP's gradient all-reduce on the micro-steps before the last one of an accumulation."""
        return wrapped.no_sync() if skip and hasattr(wrapped, "no_sync") else contextlib.nullcontext()

    def reduce_gradients(self, optimizer: torch.optim.Optimizer) -> None:
        """XLA has no DDP wrapper: average gradients across devices explicitly (DDP already did)."""
        if self.kind == "xla" and self.world > 1:
            import torch_xla.core.xla_model as xm

            xm.reduce_gradients(optimizer)

    def step_done(self) -> None:
        """Cut the lazy XLA graph: one compiled program per step (a no-op elsewhere)."""
        if self.kind == "xla":
            import torch_xla

            torch_xla.sync()

    def sum(self, t: Tensor) -> Tensor:
        """Sum a tensor over all ranks (returns it unchanged on one rank)."""
        if self.world == 1:
            return t
        if self.kind == "xla":
            import torch_xla.core.xla_model as xm

            return xm.all_reduce(xm.REDUCE_SUM, t)
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def barrier(self, tag: str = "barrier") -> None:
        if self.world == 1:
            return
        if self.kind == "xla":
            import torch_xla.core.xla_model as xm

            xm.rendezvous(tag)
        else:
            dist.barrier()

    def seed(self, seed: int) -> None:
        """Seed every generator a step may draw from (dropout) on this rank's device."""
        torch.manual_seed(seed)
        if self.kind == "xla":
            import torch_xla.core.xla_model as xm

            xm.set_rng_state(seed, device=self.device)

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False


def setup(device: str = "auto", precision: str = "auto") -> Runtime:
    """The runtime of this process: reads torchrun's environment, or asks torch_xla for its ordinal.

    precision 'auto' is bf16 autocast on accelerators and fp32 on CPU.
    """
    kind = resolve_kind(device)
    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"precision {precision!r}: expected auto, fp32 or bf16")
    bf16 = precision == "bf16" or (precision == "auto" and kind != "cpu")
    if kind == "xla":
        import torch_xla
        import torch_xla.runtime as xr

        return Runtime("xla", torch_xla.device(), xr.global_ordinal(), xr.world_size(), xr.local_ordinal(), bf16)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' was asked for but torch sees no CUDA device; use device: cpu or auto")
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        dev = torch.device("cpu")
    rt = Runtime(kind, dev, rank, world, local, bf16)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if kind == "cuda" else "gloo")
        rt.owns_group = True
    return rt
