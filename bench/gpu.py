"""GPU check to hand to an accelerator host: the native model's training step and evaluation speed, on real code paths.

    .venv/bin/python bench/gpu.py                 # CUDA, iter7 shapes: 1 GPU, then DDP on every visible GPU
    .venv/bin/python bench/gpu.py --tiny          # CPU smoke of this script (tiny profile shapes, seconds)
    .venv/bin/python bench/gpu.py --tiny --nproc 2   # ... with the DDP path too (2 gloo ranks via torchrun)

What it prints, in order:
1. device, the native model's parameter count;
2. training (models.trainer.train: bf16 autocast on accelerators, fused AdamW, the profile's compile setting)
   on packed windows of whole rows of mixed lengths, as the real run trains: real tokens/s (padding not
   counted), MFU (the trainer's own figure: flops_per_token x tokens/s over the dense bf16 peak of the GPU
   type, models.distributed.PEAK_BF16_FLOPS: H100 / H200 989 TFLOPS, A100 312; "n/a" on CPU or an unknown
   GPU), peak memory. Timed over the last third of the steps, so compile and warm-up are left out;
3. the same on every visible GPU, one process each (torchrun, DDP), with the scaling efficiency; one GPU
   prints why it was skipped;
4. evaluation: greedy generation tokens/s (batch 64, 160 new tokens, eos off so every row runs every step;
   KV cache, dynamic and fixed shape) and held-out target-loss tokens/s, through models.generate and
   models.trainer.heldout_loss on the eval runtime (models.generate.eval_runtime: bf16 on accelerators).

Weights are random (speed does not depend on them); data is synthetic with the profile's shapes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.generate import timed  # noqa: E402
from models.architectures import build, count_params  # noqa: E402
from models.data import PackedRows  # noqa: E402
from models.distributed import Runtime, setup  # noqa: E402
from models.generate import eval_runtime, generate  # noqa: E402
from models.sizing import profile_specs  # noqa: E402
from models.trainer import heldout_loss, train  # noqa: E402
from tinymars.profile import Profile, TrainRecipe, load_profile  # noqa: E402

RESULT = "GPU_BENCH_RESULT "  # the line a torchrun worker (rank 0) hands its numbers back on
TINY = {"profile": "tiny", "batch": 2, "steps": 2, "gen_batch": 4, "new_tokens": 8, "prompt_len": 12}
FULL = {"profile": "iter7", "batch": None, "steps": 30, "gen_batch": 64, "new_tokens": 160, "prompt_len": 48}


def native_model(prof: Profile, seed: int = 0) -> torch.nn.Module:
    """The profile's native model (random weights), built as the train stage builds it."""
    spec = next(s for s in profile_specs(prof).values() if s["arch"] == "native")
    return build(spec, vocab_size=prof.tokenizer.vocab_size, seq_len=prof.pack.seq_len,
                 channel_names=prof.channels.names, channel_dim=prof.channels.max_dim, seed=seed)


def synthetic_rows(prof: Profile, n: int, seed: int = 0) -> PackedRows:
    """n rows of mixed length (1/32 to 1/4 of seq_len: several whole rows per packed window), a prompt part
    without loss and a response part with it, channels of the profile's shape."""
    V, T, C, D = prof.tokenizer.vocab_size, prof.pack.seq_len, len(prof.channels.names), prof.channels.max_dim
    rng = np.random.default_rng(seed)
    lengths = rng.integers(max(4, T // 32), max(5, T // 4) + 1, n)
    ids = [rng.integers(5, V, n_tok + 1).astype(np.int32) for n_tok in lengths]
    masks = [(np.arange(n_tok + 1) >= int(0.4 * n_tok)).astype(np.int8) for n_tok in lengths]
    return PackedRows([f"r{i}" for i in range(n)], [f"p{i}" for i in range(n)], ["memory"] * n, ids, masks,
                      rng.standard_normal((n, C, D)).astype(np.float32), 4 * lengths.astype(np.int64))


def train_bench(prof: Profile, kind: str, batch: int, steps: int, compile_model: bool) -> dict[str, Any]:
    """Train the native for `steps` steps of `batch` windows per process; numbers of the last logged window.

    Runs in this process, or in each torchrun worker (setup reads RANK / WORLD_SIZE); rank 0's dict is the result.
    """
    rt = setup(kind, "auto")
    try:
        model = native_model(prof)
        params = count_params(model)
        rows = synthetic_rows(prof, max(64, 8 * batch * rt.world))
        cfg = TrainRecipe(steps=steps, batch_size=batch * rt.world, lr=3e-4, warmup_steps=1, weight_decay=0.1,
                          log_every=max(1, steps // 3), eval_every=10**9, seed=0, device=kind, precision="auto",
                          compile=compile_model and kind == "cuda", packing=True)
        if kind == "cuda":
            torch.cuda.reset_peak_memory_stats(rt.device)
        with tempfile.TemporaryDirectory() as tmp:
            train(model, rows, None, cfg, Path(tmp), pad_id=0, log=lambda _: None, runtime=rt)
            last = json.loads((Path(tmp) / "metrics.jsonl").read_text().splitlines()[-1]) if rt.is_main else {}
        return {"device": rt.device_name, "params": params, "world": rt.world, "batch": batch,
                "tok_per_s": last.get("tok_per_s"), "mfu": last.get("mfu"), "peak_mem": peak_memory(rt)}
    finally:
        rt.close()
        if kind == "cuda":  # hand the memory back before the DDP workers start on the same GPUs
            torch.cuda.empty_cache()


def peak_memory(rt: Runtime) -> tuple[str, float]:
    """(what was measured, GiB): the allocator's peak on CUDA, the process's peak RSS elsewhere."""
    if rt.kind == "cuda":
        return "peak GPU memory allocated", torch.cuda.max_memory_allocated(rt.device) / 2**30
    return "peak process RSS", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def ddp_bench(args: argparse.Namespace, nproc: int) -> dict[str, Any]:
    """The training bench again on `nproc` processes (torchrun --standalone; NCCL on CUDA, gloo on CPU)."""
    from models.launch import run_streaming

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(Path(__file__).resolve()), "--worker", "--profile", args.profile, "--batch", str(args.batch),
           "--steps", str(args.steps), "--device", args.device, *([] if args.compile else ["--eager"])]
    results: list[dict[str, Any]] = []
    code, tail = run_streaming(cmd, lambda line: results.append(json.loads(line[len(RESULT):]))
                               if line.startswith(RESULT) else None, cwd=ROOT, env={"OMP_NUM_THREADS": "1"})
    if code != 0 or not results:
        raise SystemExit(f"DDP run on {nproc} processes failed (exit {code}):\n" + "\n".join(tail[-15:]))
    return results[0]


def eval_bench(prof: Profile, kind: str, gen_batch: int, new_tokens: int, prompt_len: int) -> list[tuple[str, float]]:
    """(what, tokens/s) of greedy generation and of the held-out target loss, on the eval runtime."""
    rt = eval_runtime(kind)
    model = native_model(prof).to(rt.device).eval()
    C, D, V = len(prof.channels.names), prof.channels.max_dim, prof.tokenizer.vocab_size
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(5, V, (prompt_len - i % 7,), generator=g).tolist() for i in range(gen_batch)]
    channels = torch.randn(gen_batch, C, D, generator=g)
    kw = dict(max_new_tokens=new_tokens, eos_id=-1, pad_id=0, batch_size=gen_batch, runtime=rt)
    out = []
    for name, fixed in (("generation, kv cache", False), ("generation, kv cache, fixed shape", True)):
        generate(model, prompts, channels, **{**kw, "max_new_tokens": 4}, fixed_shape=fixed)  # warm-up
        seconds, _ = timed(lambda fixed=fixed: generate(model, prompts, channels, fixed_shape=fixed, **kw))
        out.append((f"{name} (batch {gen_batch} x {new_tokens} new tokens)", gen_batch * new_tokens / seconds))
    rows = synthetic_rows(prof, 6 * gen_batch, seed=1)
    heldout_loss(model, rows.subset(range(4)), gen_batch, prof.pack.seq_len, 0, runtime=rt)  # warm-up
    t0 = time.perf_counter()
    loss = heldout_loss(model, rows, gen_batch, prof.pack.seq_len, 0, runtime=rt)
    out.append(("held-out target loss (packed windows)", loss["tokens"] / (time.perf_counter() - t0)))
    return out


def report_train(label: str, r: dict[str, Any]) -> None:
    mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "n/a (CPU, fp32 or a GPU type without a known peak)"
    what, gib = r["peak_mem"]
    print(f"  {label}: {r['tok_per_s']:,.0f} real tokens/s, MFU {mfu}, {what} {gib:.2f} GiB "
          f"({r['batch']} windows per process per step)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="CPU smoke of this script: the tiny profile's shapes, a few "
                                                       "steps, generation batch 4 x 8 new tokens")
    p.add_argument("--profile", default=None, help="the profile whose native model and data shapes to run "
                                                   "(default iter7; tiny with --tiny)")
    p.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda (cpu with --tiny)")
    p.add_argument("--batch", type=int, default=None, help="packed windows per process per step "
                                                           "(default: the profile's train.batch_size)")
    p.add_argument("--steps", type=int, default=None, help="training steps (the last third is timed)")
    p.add_argument("--nproc", type=int, default=None, help="DDP processes (default: every visible GPU; 1 on CPU)")
    p.add_argument("--eager", dest="compile", action="store_false", help="no torch.compile (default: the "
                                                                          "profile's train.compile)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # one torchrun rank of the DDP run
    p.set_defaults(compile=True)
    args = p.parse_args()
    preset = TINY if args.tiny else FULL
    args.profile = args.profile or preset["profile"]
    args.device = args.device or ("cpu" if args.tiny else "cuda")
    args.steps = args.steps or preset["steps"]
    if args.steps < 2:
        raise SystemExit("--steps must be >= 2: the first step (compile, warm-up) is never timed")
    prof = load_profile(args.profile, [])
    args.batch = args.batch or preset["batch"] or prof.train.batch_size
    args.compile = args.compile and prof.train.compile
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device visible: run this on a GPU host, or `--tiny` for the CPU smoke of the script")
    if args.worker:
        result = train_bench(prof, args.device, args.batch, args.steps, args.compile)
        if int(os.environ.get("RANK", "0")) == 0:
            print(RESULT + json.dumps(result), flush=True)
        return

    args.compile = args.compile and args.device == "cuda"
    one = train_bench(prof, args.device, args.batch, args.steps, args.compile)
    print(f"device: {one['device']}; profile {prof.name}: native model {one['params'] / 1e6:.2f}M params, "
          f"seq {prof.pack.seq_len}, vocab {prof.tokenizer.vocab_size}, compile {args.compile}")
    print(f"training ({args.steps} steps, packed windows, {'bf16 autocast' if args.device == 'cuda' else 'fp32'}):")
    report_train("1 process", one)
    nproc = args.nproc or (torch.cuda.device_count() if args.device == "cuda" else 1)
    if nproc > 1:
        many = ddp_bench(args, nproc)
        report_train(f"DDP, {nproc} processes", many)
        print(f"  DDP scaling efficiency: {many['tok_per_s'] / (nproc * one['tok_per_s']):.0%} of {nproc} x 1 process")
    else:
        print("  DDP: skipped, 1 GPU visible (on N >= 2 GPUs this runs torchrun --nproc_per_node=N by itself; "
              "--nproc N to force)")
    print("evaluation (greedy, eos off; the eval runtime's precision):")
    for name, tok_s in eval_bench(prof, args.device, preset["gen_batch"], preset["new_tokens"], preset["prompt_len"]):
        print(f"  {name}: {tok_s:,.0f} tokens/s")


if __name__ == "__main__":
    main()
