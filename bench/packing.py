"""Packed training data, measured side by side in one run (issue 14).

1. Packing efficiency (real tokens / positions) of one training epoch, padded (one row per sequence)
   vs packed (windows of whole rows, models.data), on the smoke corpus (built with
   `tinymars run --profile smoke --only pack`, or `--pack DIR` / `--home DIR` to reuse one;
   `--smoke-seq-len N` packs it at another pack.seq_len) and on iter7-shaped synthetic rows
   (mean ~82 tokens, seq_len 2048). Goal: packed >= 0.95 on both. Rows are never cut, so a window
   holds whole rows only: rows longer than half of seq_len mostly travel alone.
2. tokens/s counting real tokens of the real trainer (models.trainer.train), padded vs packed, same
   model and rows, runs interleaved (A B A B ...) so machine noise hits both alike; median per path.
3. What iter7's shape means, computed (nothing allocated): logits memory of one batch before (fp32
   logits at every position of 32 padded rows) and after (bf16 logits at target positions only),
   per batch and per the same rows, plus the packed path's own costs (row mask, channel tiles)
   and what `steps x batch_size` then means in tokens.

    python bench/packing.py [--pack DIR | --home DIR] [--smoke-seq-len N] [--steps 6] [--rounds 2] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.architectures import build, count_params  # noqa: E402
from models.data import (  # noqa: E402
    PackedRows,
    WindowStream,
    load_split,
    loss_token_counts,
    row_positions,
    tile_slots,
    tiling,
)
from models.trainer import train  # noqa: E402
from tinymars.profile import TrainRecipe, load_profile  # noqa: E402

GOAL = 0.95
GiB = 2**30


# ---- data ------------------------------------------------------------------------------------------
def smoke_pack(args: argparse.Namespace) -> Path:
    """A smoke pack artifact folder: --pack, the newest one of that seq_len under --home, or built there
    (a temporary home without --home)."""
    if args.pack:
        return Path(args.pack)
    seq_len = args.smoke_seq_len or load_profile("smoke").pack.seq_len
    home = Path(args.home) if args.home else Path(tempfile.mkdtemp(prefix="tinymars-packing-")) / "home"

    def found() -> list[Path]:
        packs = [p for p in (home / "artifacts" / "pack").glob("*/pack.json")
                 if json.loads(p.read_text())["seq_len"] == seq_len]
        return sorted(packs, key=lambda p: p.stat().st_mtime)

    if not found():
        print(f"building the smoke corpus up to the pack stage (seq_len {seq_len}) in {home} ...", flush=True)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PREFECT_LOGGING_LEVEL": "WARNING",
               "PREFECT_HOME": str(home.parent / "prefect")}
        exe = Path(sys.executable).with_name("tinymars")
        done = subprocess.run([str(exe), "run", "--profile", "smoke", "--only", "pack", "--home", str(home),
                               "--set", f"pack.seq_len={seq_len}"], env=env, capture_output=True, text=True)
        if done.returncode != 0:
            sys.stderr.write(done.stdout[-3000:] + done.stderr[-3000:])
            raise SystemExit(f"building the smoke pack failed (exit {done.returncode})")
    return found()[-1].parent


def iter7_rows(n: int, vocab: int, seed: int = 0) -> PackedRows:
    """Synthetic rows shaped like iter7's: prompt ~43 tokens, target + eos ~39 (mean ~82, ~47% targets:
    the issue's 4% real / 1.9% loss positions at seq 2048); six channels of 1024 (text) or fewer dims."""
    rng = np.random.default_rng(seed)
    prompt = rng.normal(43, 10, n).clip(12).astype(int)
    target = rng.lognormal(math.log(36), 0.4, n).clip(2).astype(int)
    ids = [rng.integers(5, vocab, p + t).astype(np.int32) for p, t in zip(prompt, target, strict=True)]
    masks = [np.r_[np.zeros(p, np.int8), np.ones(t, np.int8)] for p, t in zip(prompt, target, strict=True)]
    names = [f"r{i}" for i in range(n)]
    return PackedRows(names, names, ["memory"] * n, ids, masks, np.zeros((n, 0, 0), np.float32), np.ones(n, np.int64))


# ---- 1. packing efficiency ---------------------------------------------------------------------------
def efficiency(name: str, rows: PackedRows, seq_len: int) -> dict[str, float]:
    lengths = row_positions(rows, seq_len)
    windows = WindowStream(lengths, seq_len, seed=0).epoch(0)
    real = int(lengths.sum())
    out = {"rows": len(rows), "mean_row": float(lengths.mean()), "padded": real / (len(rows) * seq_len),
           "windows": len(windows), "packed": real / (len(windows) * seq_len),
           "rows_per_window": len(rows) / len(windows), "slots": WindowStream(lengths, seq_len, 0).slots,
           "tile_slots": tile_slots(lengths, seq_len)}
    verdict = "met" if out["packed"] >= GOAL else "NOT met"
    print(f"  {name:34} {out['rows']:>6} rows of {out['mean_row']:5.1f} positions, seq {seq_len:>5}: "
          f"padded {out['padded']:6.1%}  packed {out['packed']:6.1%} in {out['windows']:>5} windows "
          f"({out['rows_per_window']:.1f} rows each; R={out['slots']}, Rb={out['tile_slots']})  "
          f"goal >= {GOAL:.0%}: {verdict}")
    return out


# ---- 2. tokens/s, real tokens ------------------------------------------------------------------------
def throughput(rows: PackedRows, meta: dict, args: argparse.Namespace) -> dict[str, float]:
    prof = load_profile("smoke")
    spec = {"arch": "native", **{k: v for k, v in prof.train.models[0].model_dump().items()
                                 if k in ("n_layer", "n_head", "d_model") and v is not None}}
    build_kw = {k: meta[k] for k in ("vocab_size", "seq_len", "channel_names", "channel_dim")}
    runs: dict[bool, list[float]] = {False: [], True: []}
    per_step: dict[bool, float] = {}
    for _ in range(args.rounds):
        for packing in (False, True):
            cfg = TrainRecipe(steps=args.steps, batch_size=prof.train.batch_size, lr=prof.train.lr, warmup_steps=1,
                              log_every=args.steps, eval_every=10**9, seed=0, device="cpu", packing=packing)
            model = build(spec, **build_kw, seed=0)
            with tempfile.TemporaryDirectory() as tmp:
                summary = train(model, rows, None, cfg, Path(tmp), meta["pad_id"], log=lambda _: None)
            runs[packing].append(summary["timing"]["tok_per_s"])
            per_step[packing] = summary["timing"]["real_tokens"] / summary["timing"]["steps"]
    med = {p: statistics.median(v) for p, v in runs.items()}
    print(f"  native {spec['n_layer']}L d{spec['d_model']} ({count_params(model):,} params), smoke rows, batch "
          f"{prof.train.batch_size} x seq {meta['seq_len']}, {args.steps} steps x {args.rounds} rounds, "
          f"{torch.get_num_threads()} threads; median real tokens/s:")
    for packing, label in ((False, "padded (one row per sequence)"), (True, "packed (windows of rows)")):
        print(f"    {label:32} {med[packing]:>10,.0f} tok/s   {per_step[packing]:>8,.0f} real tokens per step")
    print(f"    packed / padded: {med[True] / med[False]:.2f}x real tokens per second")
    return {"padded_tok_s": med[False], "packed_tok_s": med[True], "ratio": med[True] / med[False]}


# ---- 3. iter7, computed ------------------------------------------------------------------------------
def iter7_figures(eff: dict[str, float], rows: PackedRows) -> dict[str, float]:
    prof = load_profile("iter7")
    B, T, V = prof.train.batch_size, prof.pack.seq_len, prof.tokenizer.vocab_size
    lengths = row_positions(rows, T)
    loss_per_row = float(loss_token_counts(rows, T).mean())
    real_per_row = float(lengths.mean())
    # before: B padded rows, the head at every position in fp32 (lm_head output upcast), CE's log-softmax
    # (fp32) and its gradient: 3 fp32 copies + the bf16 head output under autocast
    before_logits = B * T * V
    before_bytes = before_logits * (4 + 4 + 4 + 2)
    # after: B windows, the head only at target positions, bf16 out + fp32 log-softmax and gradient
    targets_after = B * T * eff["packed"] * loss_per_row / real_per_row
    after_logits = targets_after * V
    after_bytes = after_logits * (2 + 4 + 4 + 4)
    same_rows_after = B * loss_per_row * V * (2 + 4 + 4 + 4)  # the same B rows, packed
    # packed-path extras per window batch: the [B,T,T] row mask, and per layer the tile scores of the injection
    C, K = len(prof.channels.names), 4
    n_tiles, span = tiling(T)
    rb = eff["tile_slots"]
    native = prof.train.models[0]
    mask_bytes = B * T * T
    tile_scores = B * n_tiles * native.n_head * span * rb * C * K * 2  # bf16, per layer
    tokens_step_before, tokens_step_after = B * real_per_row, B * T * eff["packed"]
    epoch_tokens = real_per_row * len(rows)
    steps = prof.train.steps
    print(f"  profile iter7: batch_size {B}, seq_len {T}, vocab {V:,}; rows of {real_per_row:.0f} positions, "
          f"{loss_per_row:.0f} of them targets")
    print(f"    logits of one batch before (32 padded rows, fp32, every position): {before_logits:,.0f} logits, "
          f"{before_logits * 4 / GiB:.1f} GiB the tensor, ~{before_bytes / GiB:.1f} GiB with CE's copies and grad")
    print(f"    logits of one batch after  (32 windows, bf16, targets only):       {after_logits:,.0f} logits, "
          f"{after_logits * 2 / GiB:.1f} GiB the tensor, ~{after_bytes / GiB:.1f} GiB with CE's copies and grad")
    print(f"    the same 32 rows packed: {B * loss_per_row * V:,.0f} logits, ~{same_rows_after / GiB:.2f} GiB "
          f"({before_bytes / same_rows_after:.0f}x less than before)")
    print(f"    packed-path extras: row mask {mask_bytes / 2**20:.0f} MiB per batch; injection tile scores "
          f"{tile_scores / 2**20:.0f} MiB per layer ({n_tiles} tiles of {span}, Rb={rb} rows x {C * K} channel "
          f"tokens, bf16)")
    print(f"    real tokens per step: before {tokens_step_before:,.0f} ({tokens_step_before / (B * T):.1%} of "
          f"{B * T:,} positions), after {tokens_step_after:,.0f}: {tokens_step_after / tokens_step_before:.0f}x "
          f"per step at about the same compute (both run {B * T:,} positions)")
    print(f"    steps x batch_size = {steps} x {B} windows = {steps * tokens_step_after / 1e9:.2f}B real tokens "
          f"= {steps * tokens_step_after / epoch_tokens:,.0f} epochs of {len(rows):,} rows ({epoch_tokens / 1e6:.2f}M "
          f"tokens); the same tokens as before take {steps * tokens_step_before / tokens_step_after:,.0f} steps")
    return {"before_logits": before_logits, "after_logits": after_logits, "before_gib": before_bytes / GiB,
            "after_gib": after_bytes / GiB, "same_rows_gib": same_rows_after / GiB,
            "tokens_per_step_before": tokens_step_before, "tokens_per_step_after": tokens_step_after}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pack", help="a smoke pack artifact folder (holds pack.json)")
    ap.add_argument("--home", help="a tinymars home with a smoke pack (built there when missing)")
    ap.add_argument("--smoke-seq-len", type=int, help="pack.seq_len of the smoke pack (default: the profile's)")
    ap.add_argument("--steps", type=int, default=6, help="training steps per timed run")
    ap.add_argument("--rounds", type=int, default=2, help="timed runs per path, interleaved")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    pack = smoke_pack(args)
    meta = json.loads((pack / "pack.json").read_text())
    smoke = {s: load_split([pack / n for n in meta["shards"][s]], meta["channel_dim"]) for s in ("train", "heldout")}
    iter7_prof = load_profile("iter7")
    n_iter7 = 7000  # ~9,000 rows (600 prompts x 6 capabilities), 75% train
    synthetic = iter7_rows(n_iter7, iter7_prof.tokenizer.vocab_size)

    print("1. packing efficiency (real tokens / positions), one epoch of the train split")
    results = {"smoke": efficiency(f"smoke corpus ({pack.name[:8]})", smoke["train"], meta["seq_len"]),
               "smoke_heldout": efficiency("smoke held-out split", smoke["heldout"], meta["seq_len"]),
               "iter7": efficiency("iter7-shaped synthetic rows", synthetic, iter7_prof.pack.seq_len)}
    print("2. training throughput, real tokens")
    results["throughput"] = throughput(smoke["train"], meta, args)
    print("3. iter7 shape, computed")
    results["iter7_memory"] = iter7_figures(results["iter7"], synthetic)
    print(json.dumps(results, default=float))


if __name__ == "__main__":
    main()
