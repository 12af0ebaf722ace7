"""`tinymars`: run an iteration, inspect runs and lineage. Inputs are validated before any work."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from tinymars.profile import ProfileError, load_profile, shipped_profiles
from tinymars.stages import ORDER, downstream

DEFAULT_HOME = os.environ.get("TINYMARS_HOME", ".tinymars")


def home_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--home", default=DEFAULT_HOME,
        help="folder holding the artifact store and lineage.duckdb (default: $TINYMARS_HOME or ./.tinymars)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tinymars",
        description="Run proprioceptive-channel LM experiment iterations: corpus -> channels -> tokenizer "
        "-> pack -> train -> eval -> report, each stage cached by content and recorded in DuckDB lineage.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run one iteration (reuses every stage whose inputs did not change)")
    run.add_argument("--profile", required=True, help=f"a shipped profile ({', '.join(shipped_profiles())}) "
                     "or a path to a YAML profile")
    run.add_argument("--refresh", action="append", default=[], metavar="STAGE",
                     help=f"force STAGE and everything downstream of it; repeatable; one of {', '.join(ORDER)}")
    run.add_argument("--only", metavar="STAGE", choices=ORDER,
                     help="stop after STAGE (the stages it needs still run or come from cache)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                     help="override a profile value (YAML syntax), e.g. --set train.steps=50; repeatable")
    home_arg(run)

    val = sub.add_parser("validate", help="validate a profile and exit (no work is done)")
    val.add_argument("--profile", required=True)
    val.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")

    sub.add_parser("profiles", help="list the shipped profiles")

    runs = sub.add_parser("runs", help="list recent runs with their stage cache hits")
    runs.add_argument("--limit", type=int, default=20)
    runs.add_argument("--json", action="store_true", help="machine-readable output")
    home_arg(runs)

    lin = sub.add_parser("lineage", help="show a run's stages, or an artifact's parents and children")
    lin.add_argument("ident", metavar="RUN_OR_ARTIFACT", help="a run id or artifact hash (a unique prefix works)")
    lin.add_argument("--json", action="store_true", help="machine-readable output")
    home_arg(lin)

    from tinymars.commands import register_all

    register_all(sub)
    return parser


def fail(message: str, code: int = 2) -> int:
    print(f"tinymars: error: {message}", file=sys.stderr)
    return code


def call_flow(label: str, on_interrupt: str, flow_fn: Any, **params: Any) -> tuple[Any, int | None]:
    """Run a flow for a command: Ctrl-C and a failed flow become one clean error line and an exit code.

    The flow has already logged the traceback and recorded the failure; the user gets the reason once.
    Returns (result, None) on success, (None, exit code) otherwise.
    """
    try:
        return flow_fn(**params), None
    except KeyboardInterrupt:
        return None, fail(f"interrupted; {on_interrupt}", 130)
    except Exception as exc:
        return None, fail(f"{label} failed: {type(exc).__name__}: {exc}", 1)


def preflight(profile_arg: str, overrides: list[str], refresh: list[str]) -> Any:
    """Everything that can be checked before work starts; raises ProfileError with the fix."""
    prof = load_profile(_absolute(profile_arg), overrides)
    try:
        downstream(refresh)
    except ValueError as exc:
        raise ProfileError(str(exc)) from None
    from models.registry import REGISTRY

    for spec in prof.train.models:
        if spec.arch not in REGISTRY:
            raise ProfileError(
                f"train.models[{spec.name}].arch: unknown architecture '{spec.arch}'; "
                f"registered: {', '.join(sorted(REGISTRY))}"
            )
        if spec.arch == "adapter" and not Path(spec.base).expanduser().exists():
            raise ProfileError(
                f"train.models[{spec.name}].base: '{spec.base}' does not exist; point it at a local Hugging Face "
                "model folder (config.json) or one of our trained model folders (model.json)"
            )
    from corpus.teacher_corpus import check_runnable

    try:  # the teacher's key is in the environment variable the profile names (never printed), templates load
        check_runnable(prof.corpus)
    except ValueError as exc:
        raise ProfileError(str(exc)) from None
    return prof


def runnable_here(prof: Any) -> str | None:
    """Why a valid profile cannot run on this machine with this version, or None."""
    return missing_device(prof)


def missing_device(prof: Any) -> str | None:
    """A device the profile names that this machine lacks (training dispatched to a work pool is not checked)."""
    import importlib.util

    wants_cuda = {"channels.embedder.device": prof.channels.embedder.device}
    if prof.orchestration.train_dispatch == "local":
        wants_cuda["train.device"] = prof.train.device
        if prof.train.device == "xla" and importlib.util.find_spec("torch_xla") is None:
            return ("train.device: 'xla' but torch_xla is not installed here; run on the TPU host (install the "
                    "tpu extra), or use device: auto")
    wants_cuda = {k: v for k, v in wants_cuda.items() if str(v).startswith("cuda")}
    if wants_cuda:
        import torch

        if not torch.cuda.is_available():
            field, value = next(iter(wants_cuda.items()))
            return (f"{field}: '{value}' but no CUDA GPU is visible here; use auto (the GPU when there is one) or "
                    "cpu, or set orchestration.train_dispatch: deployment to train on an accelerator work pool")
    return None


def _absolute(profile_arg: str) -> str:
    """Paths are made absolute so a flow run elsewhere (a worker) finds the same file."""
    path = Path(profile_arg).expanduser()
    if profile_arg in shipped_profiles() or not (path.suffix in (".yaml", ".yml") or path.exists()):
        return profile_arg  # a shipped name, or an unknown one the loader names as typed
    return str(path.resolve())


def cmd_run(args: argparse.Namespace) -> int:
    try:
        prof = preflight(args.profile, args.overrides, args.refresh)
    except ProfileError as exc:
        return fail(str(exc))
    if reason := runnable_here(prof):
        return fail(reason)
    from tinymars import supervisor

    if supervisor.is_worker():
        supervisor.watch_supervisor()
    elif supervisor.needs_supervisor():  # Prefect's temporary server must not outlive a kill -9 of this process
        return supervisor.run_supervised(args.argv)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    home = str(Path(args.home).resolve())
    print(f"tinymars: profile '{prof.name}' is valid; home {home}", flush=True)
    from flows.iteration import iteration

    out, code = call_flow("run", "finished stages stay cached, rerun the same command to continue", iteration,
                          profile=_absolute(args.profile), home=home, refresh=args.refresh,
                          overrides=args.overrides, only=args.only)
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
    if reason := runnable_here(prof):
        print(f"note: cannot run here: {reason}")
    return 0


def print_table(rows: list[dict[str, Any]]) -> None:
    if not rows:
        print("(none)")
        return
    cols = list(rows[0])
    cells = [[("" if r[c] is None else str(r[c])) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))


def open_lineage(home: str):
    from tinymars.lineage import Lineage

    path = Path(home) / "lineage.duckdb"
    if not path.exists():
        raise FileNotFoundError(f"no lineage database at {path}; run `tinymars run` first or pass --home")
    return Lineage(path)


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
