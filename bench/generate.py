"""Generation speed: tokens/s with the KV cache vs without (full recompute every step), side by side.

    .venv/bin/python bench/generate.py                   # smoke-shaped native model, 256 new tokens
    .venv/bin/python bench/generate.py --fixed-shape     # also the fixed-shape (XLA) mode

Both paths generate exactly the same tokens (greedy, eos disabled so every row runs all steps);
only the work per step differs: the cache decodes one token, the reference re-runs the whole
sequence. The ratio is the point (goal: >= 5x at 256 new tokens); absolute numbers depend on the box.
"""

from __future__ import annotations

import argparse
import time

import torch

from models.architectures import build
from models.generate import generate


def timed(fn) -> tuple[float, list[list[int]]]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=48)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=1500)
    ap.add_argument("--fixed-shape", action="store_true", help="also time the fixed-shape (XLA) cache mode")
    args = ap.parse_args()
    torch.manual_seed(0)
    names, dim = ("memory", "affect", "time"), 384
    model = build({"arch": "native", "n_layer": args.layers, "n_head": 4, "d_model": args.d_model},
                  vocab_size=args.vocab, seq_len=args.prompt_len + args.new_tokens, channel_names=names,
                  channel_dim=dim, seed=0).eval()
    prompts = [torch.randint(5, args.vocab, (args.prompt_len - i % 7,)).tolist() for i in range(args.batch)]
    channels = torch.randn(args.batch, len(names), dim)
    kw = dict(max_new_tokens=args.new_tokens, eos_id=-1, pad_id=0, batch_size=args.batch)
    generate(model, prompts, channels, **{**kw, "max_new_tokens": 4})  # warm-up
    rows = [("kv cache", *timed(lambda: generate(model, prompts, channels, **kw)))]
    if args.fixed_shape:
        rows.append(("kv cache, fixed shape", *timed(lambda: generate(model, prompts, channels, fixed_shape=True,
                                                                        **kw))))
    rows.append(("no cache (recompute)", *timed(lambda: generate(model, prompts, channels, use_cache=False, **kw))))
    reference = rows[0][2]
    assert all(out == reference for _, _, out in rows), "the paths disagree on the generated tokens"
    tokens = args.batch * args.new_tokens
    slow = rows[-1][1]
    print(f"{args.batch} prompts x {args.new_tokens} new tokens, {args.layers} layers, d_model {args.d_model}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'path':<24}{'seconds':>10}{'tokens/s':>12}{'speed-up':>10}")
    for name, sec, _ in rows:
        print(f"{name:<24}{sec:>10.2f}{tokens / sec:>12,.0f}{slow / sec:>9.1f}x")


if __name__ == "__main__":
    main()
