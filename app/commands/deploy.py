"""`tinymars deploy` (register deploy/prefect.yaml against the current Prefect API) and
`tinymars serve` (one box: serve the same deployments, schedules included, from this process)."""

from __future__ import annotations

import argparse
from pathlib import Path

from app.common import fail, home_arg


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("deploy", help="create the work pools and register the deployments of deploy/prefect.yaml")
    p.add_argument("--name", action="append", default=[], metavar="DEPLOYMENT",
                   help="register only this deployment (repeatable); default: all")
    home_arg(p)
    p.set_defaults(handler=run_deploy)

    s = sub.add_parser("serve", help="serve every deployment (with its schedule) from this process, no worker")
    s.add_argument("--only", action="append", default=[], metavar="DEPLOYMENT",
                   help="serve only this deployment (repeatable); default: all but 'train'")
    home_arg(s)
    s.set_defaults(handler=run_serve)


def _api_url() -> str | None:
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or None


def run_deploy(args: argparse.Namespace) -> int:
    from deploy.deployments import apply_deployments, load_config

    if not _api_url():
        return fail("no Prefect API configured: start one with `prefect server start` and set PREFECT_API_URL "
                    "(e.g. `prefect config set PREFECT_API_URL=http://127.0.0.1:4200/api`); see deploy/README.md")
    known = {d["name"] for d in load_config()["deployments"]}
    unknown = set(args.name) - known
    if unknown:
        return fail(f"--name: unknown deployment(s) {sorted(unknown)}; deploy/prefect.yaml has {sorted(known)}")
    try:
        names = apply_deployments(args.home, args.name or None)
    except Exception as exc:  # the API is down or refuses: say which and stop
        return fail(f"registering deployments against {_api_url()} failed: {type(exc).__name__}: {exc}", 1)
    print(f"registered {len(names)} deployment(s) against {_api_url()} (home {Path(args.home).resolve()}):")
    for name in names:
        print(f"  {name}")
    print("start a worker per pool, e.g. `prefect worker start --pool tinymars-cpu`")
    return 0


def run_serve(args: argparse.Namespace) -> int:
    from prefect import serve

    from deploy.deployments import build_deployments, load_config

    config = load_config()
    known = {d["name"] for d in config["deployments"]}
    wanted = set(args.only) or known - {"train"}
    if wanted - known:
        return fail(f"--only: unknown deployment(s) {sorted(wanted - known)}; deploy/prefect.yaml has {sorted(known)}")
    deployments = build_deployments(config, args.home, wanted, with_pools=False)
    print(f"serving {', '.join(sorted(wanted))} (Ctrl-C to stop)", flush=True)
    serve(*deployments)
    return 0
