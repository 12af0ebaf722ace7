"""`tinymars sweep --profile P --vary KEY=V1,V2 ...`: run a grid of iterations as one Prefect flow (flows/sweep.py).

Every grid point is pre-flighted like `tinymars run --set KEY=V` before any work; the points share every
stage whose inputs they share (built once) and the sweep report tables them all."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from app.common import call_flow, fail, home_arg, preflight, runnable_here
from tinymars.profile import ProfileError, shipped_profiles
from tinymars.sweep import SweepError, check_vary, grid_points, parse_vary, point_overrides


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="run a grid of iterations (--vary KEY=V1,V2), sharing every cached stage")
    p.add_argument("--profile", required=True, help=f"a shipped profile ({', '.join(shipped_profiles())}) "
                   "or a path to a YAML profile")
    p.add_argument("--vary", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="a profile key and its values (YAML syntax, as --set), e.g. train.lr=1e-3,3e-3; repeatable: "
                   "the grid is the product; default: the profile's sweep.vary")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a base profile value for every point (YAML syntax); repeatable")
    p.add_argument("--max-parallel", type=int, default=None, metavar="N",
                   help="points running at once (default: the profile's sweep.max_parallel, else 1; on CPU keep 1, "
                   "on an accelerator each point's training takes the devices its profile names)")
    home_arg(p)
    p.set_defaults(handler=cmd_sweep)


def cmd_sweep(args: argparse.Namespace) -> int:
    if args.max_parallel is not None and args.max_parallel < 1:
        return fail(f"--max-parallel: {args.max_parallel}; give 1 or more")
    try:
        base = preflight(args.profile, args.overrides, [])
        vary = check_vary(parse_vary(args.vary) if args.vary else (base.sweep.vary if base.sweep else None))
        points = grid_points(vary)
        for i, point in enumerate(points):  # every point as `tinymars run --set ...` would check it
            try:
                prof = preflight(args.profile, args.overrides + point_overrides(point), [])
            except ProfileError as exc:
                raise ProfileError(f"sweep point {i} ({', '.join(point_overrides(point))}): {exc}") from None
            if reason := runnable_here(prof):
                raise ProfileError(f"sweep point {i} ({', '.join(point_overrides(point))}): {reason}")
    except (ProfileError, SweepError) as exc:
        return fail(str(exc))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    home = str(Path(args.home).resolve())
    print(f"tinymars: sweep of '{base.name}': {len(points)} points, all valid; home {home}", flush=True)
    from flows.sweep import sweep

    out, code = call_flow("sweep", "finished stages stay cached, rerun the same command to continue", sweep,
                          profile=base, home=home, vary=vary, max_parallel=args.max_parallel)
    if code is not None:
        return code
    print()
    print(f"sweep {out['run_id']}")
    for i, p in enumerate(out["points"]):
        hits = sum(s["cache_hit"] for s in p["stages"])
        print(f"  point-{i}  run {p['run_id']}  {hits}/{len(p['stages'])} stages from cache  {p['report']}")
    print(f"report: {out['report']}")
    return 0
