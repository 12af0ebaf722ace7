"""`tinymars bench-arch`: train several architectures for the same wall-clock budget on the same data; print the table.

    tinymars bench-arch --profile smoke --models native,baseline,vocab_graph,vocab_conv --minutes 1

Models are `train.models` names of the profile or registered architectures usable with their
defaults (vocab_graph, vocab_conv); give a profile entry for any other settings (e.g. a rank-64
graph). The corpus -> pack stages run first, or come from cache. Results, curves and the
loss-vs-time PNG go to HOME/bench-arch/<run id>/.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from app.common import call_flow, fail, home_arg, preflight, print_table
from tinymars.profile import ProfileError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench-arch", help="time-boxed training of several architectures on the same data; "
                                          "params, steps, val_loss, val_bpb, tok/s and a loss-vs-time plot")
    p.add_argument("--profile", required=True, help="a shipped profile (smoke, tiny, iter7) or a YAML path")
    p.add_argument("--models", required=True, metavar="A,B,...",
                   help="comma-separated train.models names or registered architectures, e.g. "
                        "native,baseline,vocab_graph,vocab_conv")
    p.add_argument("--minutes", type=float, required=True, help="wall-clock training budget per model (> 0)")
    p.add_argument("--eval-points", type=int, default=4, help="held-out evaluations per model for the curve")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a profile value (YAML syntax), e.g. --set train.lr=0.01; repeatable")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    home_arg(p)
    p.set_defaults(handler=cmd_bench_arch)


def cmd_bench_arch(args: argparse.Namespace) -> int:
    from models.bench_arch import check_budget, resolve_models

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    try:
        check_budget(args.minutes, args.eval_points)
        prof = preflight(args.profile, args.overrides, [])
        resolve_models(prof, models)
    except (ProfileError, ValueError) as exc:  # ProfileError is a ValueError; both name the field and the fix
        return fail(str(exc))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    home = str(Path(args.home).resolve())
    print(f"tinymars: bench-arch on profile '{prof.name}', {len(models)} models x {args.minutes:g} min; home {home}",
          flush=True)
    from flows.bench_arch import bench_arch

    out, code = call_flow("bench-arch", "the data stages stay cached, rerun to benchmark again", bench_arch,
                          profile=prof, models=models, minutes=args.minutes, home=home,
                          eval_points=args.eval_points)
    if code is not None:
        return code
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    print()
    print_table(out["table"])
    print(f"results: {out['results']}")
    print(f"plot: {out['plot']}")
    return 0
