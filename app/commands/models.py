"""`tinymars models --profile P`: the models a profile trains and their parameter counts; records nothing.

    tinymars models --profile iter7 [--set K=V] [--json]

Bracketing baselines are sized here exactly as the train stage sizes them (models.sizing), from the
profile's vocabulary, sequence length and channels; models are built on the meta device, so even
a multi-billion-parameter adapter base is counted in a moment without reading its weights. Counts are
of the module's own parameters and `trainable` of those the optimizer updates (a frozen adapter base is
shown apart); each channel's encoder is sized to the channel's own width, so no counted weight only
ever multiplies padding.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from app.common import fail, print_table
from tinymars.profile import ProfileError, load_profile

# The research line's iteration 7 (tinymars-site): the native and the two baselines that bracket it.
REFERENCE = {"baseline-6L": 100.8e6, "native": 110.2e6, "baseline-7L": 120.3e6}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="print the parameter count of every model a profile trains (records nothing)")
    p.add_argument("--profile", required=True, help="a shipped profile (smoke, tiny, iter7) or a YAML path")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a profile value (YAML syntax); repeatable")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=cmd_models)


def model_rows(prof: Any) -> list[dict[str, Any]]:
    """One row per model: its resolved shape, parameter counts (all, trainable, a frozen base's) and the
    ratio to the first native's count."""
    import torch

    from models.architectures import build, count_params, count_trainable
    from models.sizing import profile_specs

    kw = {"vocab_size": profile_vocab(prof), "seq_len": prof.pack.seq_len,
          "channel_names": prof.channels.names, "channel_dim": prof.channels.max_dim}
    rows = []
    for name, spec in profile_specs(prof).items():
        with torch.device("meta"):
            model = build(spec, **kw)
        row = {"name": name, "arch": spec["arch"], "n_layer": spec.get("n_layer"), "n_head": spec.get("n_head"),
               "d_model": spec.get("d_model"), "params": count_params(model), "trainable": count_trainable(model),
               "channels": list(getattr(getattr(model, "cfg", None), "channel_names", ())) or None}
        if spec["arch"] == "adapter":
            row |= {"n_layer": model.base_info["n_layer"], "d_model": model.base_info["width"],
                    "base_params": model.base_params(), "dropped": model.base_info["dropped"]}
        rows.append(row)
    native = next((r["params"] for r in rows if r["arch"] == "native"), None)
    for row in rows:
        row["vs_native"] = None if native is None else row["params"] / native - 1.0
    return rows


def profile_vocab(prof: Any) -> int:
    """The data's vocabulary: the SentencePiece size, or a frozen base's own (tokenizer.kind hf)."""
    if prof.tokenizer.kind == "hf":
        from corpus.tokenizer import base_vocab_size

        return base_vocab_size(prof.tokenizer.base, prof.tokenizer.revision)
    return prof.tokenizer.vocab_size


def cmd_models(args: argparse.Namespace) -> int:
    try:
        prof = load_profile(args.profile, args.overrides)  # no teacher key needed to count parameters
        rows = model_rows(prof)
    except (ProfileError, ValueError, OSError) as exc:
        return fail(str(exc))
    ref_native = REFERENCE["native"]
    if args.json:
        print(json.dumps({"profile": prof.name, "models": rows, "reference": REFERENCE,
                          "reference_vs_native": {k: v / ref_native - 1.0 for k, v in REFERENCE.items()}}, indent=1))
        return 0
    dims = ", ".join(f"{name} {spec.dim}" for name, spec in prof.channels.enabled.items())
    print(f"profile '{prof.name}': vocab {profile_vocab(prof):,}, seq_len {prof.pack.seq_len}, "
          f"{len(prof.channels.names)} channels ({dims}; encoders sized per channel)")
    print_table([{"model": r["name"], "arch": r["arch"], "n_layer": r["n_layer"], "n_head": r["n_head"] or "",
                  "d_model": r["d_model"],
                  "channels": "" if r["arch"] != "native" or r["channels"] == list(prof.channels.names)
                  else ",".join(r["channels"] or []), "params": f"{r['params'] / 1e6:.1f}M ({r['params']:,})",
                  "trainable": "all" if r["trainable"] == r["params"] else f"{r['trainable']:,}",
                  "vs native": "" if r["vs_native"] is None else f"{r['vs_native']:+.1%}",
                  "frozen base": f"{r['base_params'] / 1e6:.1f}M" if "base_params" in r else ""} for r in rows])
    print("reference (tinyMARS iteration 7): " + " / ".join(
        f"{k} {v / 1e6:.1f}M ({v / ref_native - 1.0:+.1%})" for k, v in REFERENCE.items()))
    return 0
