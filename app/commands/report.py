"""`tinymars report RUN`: print a run's report (or just its path) from the lineage store."""

from __future__ import annotations

import argparse
from pathlib import Path

from app.common import fail, home_arg, open_lineage


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="print the report of a run (default: the latest completed run that has one)")
    p.add_argument("run", nargs="?", metavar="RUN", help="a run id or a unique prefix; default: the latest")
    p.add_argument("--path", action="store_true", help="print only the report file's path")
    home_arg(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    try:
        lin = open_lineage(args.home)
        if args.run:
            kind, run_id = lin.resolve(args.run)
            if kind != "run":
                return fail(f"'{args.run}' is an artifact, not a run; `tinymars runs` lists run ids")
        else:
            latest = lin.query(
                "SELECT r.run_id FROM runs r JOIN stages s USING (run_id) WHERE r.status = 'completed'"
                " AND s.stage = 'report' ORDER BY r.started_at DESC LIMIT 1"
            )
            if not latest:
                return fail(f"no completed run with a report in {args.home}")
            run_id = latest[0]["run_id"]
    except (FileNotFoundError, KeyError) as exc:
        return fail(str(exc).strip("'\""))
    rows = lin.query(
        "SELECT a.path FROM stages s JOIN artifacts a ON a.content_hash = s.artifact_hash"
        " WHERE s.run_id = ? AND s.stage = 'report'",
        [run_id],
    )
    if not rows:
        return fail(f"run {run_id} has no report (it failed or stopped early); see `tinymars lineage {run_id}`")
    path = Path(rows[0]["path"]) / "report.md"
    if not path.exists():
        return fail(f"the report of run {run_id} is gone from {path}; rerun the same profile to rebuild it")
    print(path if args.path else path.read_text(encoding="utf-8"), end="" if not args.path else "\n")
    return 0
