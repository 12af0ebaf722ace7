"""Training step time, measured side by side in one run.

CPU (default): one training step (forward, loss, backward, AdamW) of
  - the native channel decoder vs a channel-less baseline of the same parameter count (goal <= 1.10);
  - our baseline decoder vs Hugging Face GPT2LMHeadModel of the same shape (goal <= 1.0).
The models take turns step by step (A B C A B C ...) so machine noise hits them alike; the
median step time of each is compared.

    python bench/train.py [--d-model 256 --n-layer 4 --n-head 4 --seq-len 256 --batch 8 --steps 12]

CUDA (`--cuda`): tokens/s and bf16 MFU of the real trainer (models.trainer.train: bf16 autocast,
fused AdamW, optional torch.compile) on the iter7 shapes (32k vocab, seq 2048, the native and its
bracketing baselines), with synthetic rows. Goal: MFU >= 40%.

    python bench/train.py --cuda [--profile iter7] [--batch 16] [--steps 60] [--compile]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.architectures import build, count_params  # noqa: E402
from models.sizing import bracket_depth, count_spec_params  # noqa: E402
from tinymars.domain import CAPABILITIES  # noqa: E402

CHANNELS = CAPABILITIES  # one channel per capability


def step_fn(model: torch.nn.Module, hf: bool = False):
    """A closure running one full training step on fixed random data; returns nothing (timed outside)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def run(idx: torch.Tensor, channels: torch.Tensor) -> None:
        logits = model(input_ids=idx).logits if hf else model(idx, channels)[0]
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), idx[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return run


def cpu_bench(args: argparse.Namespace) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.set_num_threads(args.threads)
    kw = {"vocab_size": args.vocab, "seq_len": args.seq_len, "channel_names": CHANNELS, "channel_dim": 384}
    shape = {"n_head": args.n_head, "d_model": args.d_model}
    native_spec = {"arch": "native", "n_layer": args.n_layer, **shape, "channel_tokens": 2}
    n_native = count_spec_params(native_spec, **kw)
    # "same size": the bracketing depth whose parameter count is closest to the native's
    depths = [bracket_depth(native_spec, {"arch": "baseline", **shape}, side, **kw) for side in ("below", "above")]
    same = min(depths, key=lambda n: abs(count_spec_params({"arch": "baseline", "n_layer": n, **shape}, **kw)
                                         - n_native))
    specs = {"native": native_spec, f"baseline {same}L (same size)": {"arch": "baseline", "n_layer": same, **shape},
             f"baseline {args.n_layer}L (same shape)": {"arch": "baseline", "n_layer": args.n_layer, **shape}}
    models = {name: build(spec, **kw, seed=0) for name, spec in specs.items()}
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=args.vocab, n_positions=args.seq_len, n_embd=args.d_model,
                                      n_layer=args.n_layer, n_head=args.n_head, resid_pdrop=0.0, embd_pdrop=0.0,
                                      attn_pdrop=0.0))
    gpt2.config._attn_implementation = "sdpa"
    runs = {name: step_fn(m) for name, m in models.items()}
    runs[f"HF GPT2LMHeadModel {args.n_layer}L (same shape)"] = step_fn(gpt2, hf=True)
    params = {name: count_params(m) for name, m in models.items()} | {list(runs)[-1]: count_params(gpt2)}

    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, args.vocab, (args.batch, args.seq_len), generator=g)
    channels = torch.randn(args.batch, len(CHANNELS), 384, generator=g)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for i in range(args.steps + 2):  # two warm-up rounds, not timed
        for name, run in runs.items():
            t0 = time.perf_counter()
            run(idx, channels)
            if i >= 2:
                times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(t) for name, t in times.items()}
    print(f"CPU, {args.threads} threads; batch {args.batch} x seq {args.seq_len}, vocab {args.vocab}, "
          f"d_model {args.d_model}, {args.n_head} heads; median of {args.steps} interleaved steps")
    print(f"{'model':44} {'params':>12} {'s/step':>9} {'tok/s':>9}")
    for name, t in med.items():
        print(f"{name:44} {params[name]:>12,} {t:>9.4f} {args.batch * args.seq_len / t:>9,.0f}")
    names = list(med)
    r1 = med[names[0]] / med[names[1]]
    r2 = med[names[2]] / med[names[3]]
    print(f"native / same-size baseline step time:   {r1:.3f}  (goal <= 1.10: {'met' if r1 <= 1.10 else 'NOT met'})")
    print(f"our decoder / HF GPT2 (same shape):        {r2:.3f}  (goal <= 1.00: {'met' if r2 <= 1.0 else 'NOT met'})")


def cuda_bench(args: argparse.Namespace) -> None:
    """tokens/s and MFU of the real trainer on a profile's shapes (synthetic rows of full length)."""
    from models.data import PackedRows
    from models.sizing import profile_specs
    from models.trainer import train
    from tinymars.profile import TrainRecipe, load_profile

    if not torch.cuda.is_available():
        raise SystemExit("--cuda needs a CUDA device")
    prof = load_profile(args.profile)
    V, T, C, D = prof.tokenizer.vocab_size, prof.pack.seq_len, len(prof.channels.names), prof.channels.max_dim
    rng = np.random.default_rng(0)
    n = args.batch * 4
    rows = PackedRows([f"r{i}" for i in range(n)], [f"p{i}" for i in range(n)], ["memory"] * n,
                      [rng.integers(0, V, T + 1).astype(np.int32) for _ in range(n)],
                      [np.ones(T + 1, np.int8) for _ in range(n)], rng.standard_normal((n, C, D)).astype(np.float32),
                      np.zeros(n, np.int64))
    print(f"{torch.cuda.get_device_name()}: profile {prof.name}, batch {args.batch} x seq {T}, vocab {V}, bf16 "
          f"autocast, compile={args.compile}")
    for name, spec in profile_specs(prof).items():
        if spec["arch"] == "adapter":
            continue
        model = build(spec, vocab_size=V, seq_len=T, channel_names=prof.channels.names, channel_dim=D, seed=0)
        cfg = TrainRecipe(steps=args.steps, batch_size=args.batch, lr=3e-4, warmup_steps=1, weight_decay=0.1,
                          log_every=args.steps // 3, eval_every=10**9, seed=0, device="cuda", precision="bf16",
                          compile=args.compile)
        lines: list[str] = []
        with tempfile.TemporaryDirectory() as tmp:
            train(model, rows, None, cfg, Path(tmp), pad_id=0, log=lines.append)
        last = lines[-1]  # the last window: compile and warm-up are behind it
        print(f"  {name:16} {count_params(model) / 1e6:7.1f}M params  tok/s {last.split('tok/s ')[1]}")
        del model
        torch.cuda.empty_cache()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cuda", action="store_true", help="tokens/s and bf16 MFU on the GPU (iter7 shapes)")
    p.add_argument("--profile", default="iter7", help="--cuda: the profile whose model shapes to run")
    p.add_argument("--compile", action="store_true", help="--cuda: torch.compile the model")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--vocab", type=int, default=2000)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=None, help="rows per step (CPU default 8, CUDA default 16)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (CPU default 12, CUDA default 60)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args()
    if args.cuda:
        args.batch, args.steps = args.batch or 16, args.steps or 60
        cuda_bench(args)
    else:
        args.batch, args.steps = args.batch or 8, args.steps or 12
        cpu_bench(args)


if __name__ == "__main__":
    main()
