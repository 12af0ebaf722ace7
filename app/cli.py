"""`tinymars`: run an iteration, inspect runs and lineage; every other command lives in app/commands/.

Inputs are validated before any work (app.common.preflight)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from app.budget import budget_lines
from app.common import (
    call_flow,
    fail,
    home_arg,
    open_lineage,
    preflight,
    print_table,
    runnable_here,
)
from app.power import power_lines
from tinymars.profile import ProfileError, shipped_profiles
from tinymars.progress import progress_setting_problem
from tinymars.stages import ALIAS_NOTE, ALIASES, ORDER


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tinymars",
        description="Run proprioceptive-channel LM experiment iterations: corpus -> channels -> tokenizer "
        "-> [replay] -> pack -> train -> steer -> generate -> score -> report, each stage cached by content and "
        "recorded in DuckDB lineage.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run one iteration (reuses every stage whose inputs did not change)")
    run.add_argument("--profile", required=True, help=f"a shipped profile ({', '.join(shipped_profiles())}) "
                     "or a path to a YAML profile")
    run.add_argument("--refresh", action="append", default=[], metavar="STAGE",
                     help=f"force STAGE and everything downstream of it; repeatable; one of {', '.join(ORDER)} "
                     f"({ALIAS_NOTE}: the former eval stage, kept as an alias)")
    run.add_argument("--only", metavar="STAGE", choices=(*ORDER, *ALIASES),
                     help="stop after STAGE (the stages it needs still run or come from cache); eval = score")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                     help="override a profile value (YAML syntax), e.g. --set train.steps=50; repeatable")
    run.add_argument("--rehearse", action="store_true",
                     help="check that the profile's paid run will go through: every stage on its shapes (corpus "
                     "size and split checks, vocabulary, seq_len, packing, model sizes, replay mixing) with the "
                     "offline teacher and embedder, local replay prose, 2 training steps and a small evaluation, "
                     "on the CPU (app/rehearse.py); a few minutes")
    home_arg(run)

    val = sub.add_parser("validate", help="validate a profile and exit (no work is done)")
    val.add_argument("--profile", required=True)
    val.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")

    sub.add_parser("profiles", help="list the shipped profiles")

    runs = sub.add_parser("runs", help="list recent runs with their stage cache hits")
    runs.add_argument("--limit", type=int, default=20)
    runs.add_argument("--json", action="store_true", help="machine-readable output")
    home_arg(runs)

    lin = sub.add_parser("lineage", help="show a run's stages, or an artifact's parents and children; "
                         "--openlineage FILE|URL exports the history as OpenLineage events")
    lin.add_argument("ident", metavar="RUN_OR_ARTIFACT", nargs="?",
                     help="a run id or artifact hash (a unique prefix works); not needed with --openlineage")
    lin.add_argument("--json", action="store_true", help="machine-readable output")
    home_arg(lin)

    from app.commands import add_all

    add_all(sub)
    return parser


def cmd_run(args: argparse.Namespace) -> int:
    try:
        prof = preflight(args.profile, args.overrides, args.refresh,
                         Path(args.home).resolve() if args.rehearse else None)
    except ProfileError as exc:
        return fail(str(exc))
    if reason := runnable_here(prof) or progress_setting_problem():
        return fail(reason)
    from app import supervisor

    if supervisor.is_worker():
        supervisor.watch_supervisor()
    elif supervisor.needs_supervisor():  # Prefect's temporary server must not outlive a kill -9 of this process
        return supervisor.run_supervised(args.argv)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    home = str(Path(args.home).resolve())
    print(f"tinymars: profile '{prof.name}' is valid; home {home}", flush=True)
    from flows.iteration import iteration

    out, code = call_flow("run", "finished stages stay cached, rerun the same command to continue", iteration,
                          profile=prof, home=home, refresh=args.refresh, only=args.only)
    if code is not None:
        return code
    print()
    print(f"run {out['run_id']}")
    for s in out["stages"]:
        status = "cache hit" if s["cache_hit"] else "built"
        print(f"  {s['name']:<22} {status:<10} {s['duration_s']:>8.2f}s  {s['artifact'][:12]}")
    print(f"report: {out['report']}" if out["report"] else f"stopped after {args.only} (--only)")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    try:
        prof = preflight(args.profile, args.overrides, [])
    except ProfileError as exc:
        return fail(str(exc))
    print(f"profile '{prof.name}' is valid (hash {prof.hash()[:12]})")
    print("\n".join(power_lines(prof)))
    print("\n".join(budget_lines(prof)))
    if reason := runnable_here(prof):
        print(f"note: cannot run here: {reason}")
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    try:
        rows = open_lineage(args.home).runs(args.limit)
    except FileNotFoundError as exc:
        return fail(str(exc))
    if args.json:
        print(json.dumps(rows, default=str, indent=1))
    else:
        print_table(rows)
    return 0


def cmd_lineage(args: argparse.Namespace) -> int:
    if args.openlineage is not None:
        from app.commands.lineage_export import export

        return export(args)
    if args.ident is None:
        return fail("lineage: give a RUN_OR_ARTIFACT to show, or --openlineage FILE|URL to export the history")
    try:
        lin = open_lineage(args.home)
        kind, ident = lin.resolve(args.ident)
    except (FileNotFoundError, KeyError) as exc:
        return fail(str(exc).strip("'\""))
    if kind == "run":
        stages = lin.stages(ident)
        if args.json:
            print(json.dumps({"run": ident, "stages": stages}, default=str, indent=1))
            return 0
        print(f"run {ident}")
        print_table(stages)
        return 0
    art, parents, children = lin.artifact(ident), lin.parents(ident), lin.children(ident)
    if args.json:
        print(json.dumps({"artifact": art, "parents": parents, "children": children}, default=str, indent=1))
        return 0
    print(f"artifact {ident}\n  kind {art['kind']} ({art['name']}), {art['bytes']:,} bytes, rows {art['rows']}")
    print(f"  path {art['path']}")
    for label, items in (("parents", parents), ("children", children)):
        print(f"{label}:")
        for a in items:
            print(f"  {a['content_hash'][:16]}  {a['name']:<20} {a['path']}")
        if not items:
            print("  (none)")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what a supervised worker re-runs
    if getattr(args, "handler", None) is not None:
        return args.handler(args)
    handlers = {"run": cmd_run, "validate": cmd_validate, "runs": cmd_runs, "lineage": cmd_lineage,
                "profiles": lambda a: print("\n".join(shipped_profiles())) or 0}
    return handlers[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
