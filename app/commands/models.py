"""`tinymars models --profile P`: the models a profile trains and their parameter counts; records nothing.

    tinymars models --profile iter7 [--set K=V] [--json]

Bracketing baselines are sized here exactly as the train stage sizes them (models.sizing), from the
profile's vocabulary, sequence length and channels; models are built on the meta device, so even
a multi-billion-parameter adapter base is counted in a moment without reading its weights.
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
    """One row per model: its resolved shape and parameter counts (trainable, and a frozen base's)."""
    from models.sizing import count_spec_params, profile_specs

    kw = {"vocab_size": prof.tokenizer.vocab_size, "seq_len": prof.pack.seq_len,
          "channel_names": prof.channels.names, "channel_dim": prof.channels.max_dim}
    specs = profile_specs(prof)
    native = next(s for s in specs.values() if s["arch"] == "native")
    native_params = count_spec_params(native, **kw)
    rows = []
    for name, spec in specs.items():
        params = count_spec_params(spec, **kw)
        row = {"name": name, "arch": spec["arch"], "n_layer": spec.get("n_layer"), "n_head": spec.get("n_head"),
               "d_model": spec.get("d_model"), "params": params, "vs_native": params / native_params - 1.0}
        if spec["arch"] == "adapter":
            row |= _adapter_base(spec, kw)
        rows.append(row)
    return rows


def _adapter_base(spec: dict[str, Any], kw: dict[str, Any]) -> dict[str, Any]:
    import torch

    from models.architectures import build

    with torch.device("meta"):
        model = build(spec, **kw)
    return {"n_layer": model.base_info["n_layer"], "d_model": model.base_info["width"],
            "base_params": model.base_params(), "dropped": model.base_info["dropped"]}


def cmd_models(args: argparse.Namespace) -> int:
    try:
        prof = load_profile(args.profile, args.overrides)  # no teacher key needed to count parameters
        rows = model_rows(prof)
    except (ProfileError, ValueError, OSError) as exc:
        return fail(str(exc))
    if args.json:
        print(json.dumps({"profile": prof.name, "models": rows, "reference": REFERENCE}, indent=1))
        return 0
    print(f"profile '{prof.name}': vocab {prof.tokenizer.vocab_size:,}, seq_len {prof.pack.seq_len}, "
          f"{len(prof.channels.names)} channels (D={prof.channels.max_dim})")
    print_table([{"model": r["name"], "arch": r["arch"], "n_layer": r["n_layer"], "n_head": r["n_head"] or "",
                  "d_model": r["d_model"], "params": f"{r['params'] / 1e6:.1f}M ({r['params']:,})",
                  "vs native": f"{r['vs_native']:+.1%}",
                  "frozen base": f"{r['base_params'] / 1e6:.1f}M" if "base_params" in r else ""} for r in rows])
    print("reference (tinyMARS iteration 7): " + " / ".join(f"{k} {v / 1e6:.1f}M" for k, v in REFERENCE.items()))
    return 0
