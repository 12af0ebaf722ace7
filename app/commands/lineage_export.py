"""`tinymars lineage --openlineage FILE|URL [--run RUN]`: the lineage history as OpenLineage events.

The flags extend the core `lineage` command (app/cli.py adds it before the command modules), whose
handler calls `export` when --openlineage is given. The events themselves come from
`tinymars.openlineage`; this module only checks the arguments and prints what was sent.
"""

from __future__ import annotations

import argparse

from app.common import fail, open_lineage


def add_parser(sub: argparse._SubParsersAction) -> None:
    lin = sub.choices["lineage"]
    lin.add_argument("--openlineage", metavar="FILE|URL",
                     help="export every run (or --run) as OpenLineage events: to FILE (one JSON event a line, "
                     "replaced) or an http(s) URL (Marquez: http://host:5000; DataHub: the full "
                     "/openapi/openlineage/api/v1/lineage URL; a key in $OPENLINEAGE_API_KEY is sent as a bearer)")
    lin.add_argument("--run", dest="openlineage_runs", action="append", metavar="RUN_ID",
                     help="with --openlineage: export only this run (a unique prefix works); repeatable")
    lin.add_argument("--namespace", help="with --openlineage: the OpenLineage namespace (default: tinymars://<home>)")


def export(args: argparse.Namespace) -> int:
    from tinymars.openlineage import check_target, default_namespace, lineage_events, public_target, send

    if args.ident is not None:
        return fail("lineage: give either RUN_OR_ARTIFACT or --openlineage (use --run RUN_ID to export one run)")
    try:
        check_target(args.openlineage)
        lin = open_lineage(args.home)
        runs = None
        if args.openlineage_runs:
            runs = []
            for ident in args.openlineage_runs:
                kind, full = lin.resolve(ident)
                if kind != "run":
                    return fail(f"--run: '{ident}' is an artifact, not a run; `tinymars runs` lists run ids")
                runs.append(full)
    except (ValueError, FileNotFoundError, KeyError) as exc:
        return fail(str(exc).strip("'\""))
    events = lineage_events(lin, args.namespace or default_namespace(args.home), runs)
    try:
        sent = send(events, args.openlineage)
    except RuntimeError as exc:
        return fail(str(exc))
    n_runs = len({e.run.runId for e in events if "parent" not in (e.run.facets or {})})
    runs_label = f"{n_runs} run" + ("" if n_runs == 1 else "s")
    print(f"sent {sent} OpenLineage events ({runs_label}) to {public_target(args.openlineage)}")
    return 0
