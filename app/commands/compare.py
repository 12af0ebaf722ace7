"""`tinymars compare RUN_A RUN_B`: two iterations side by side, from lineage and their artifacts;
`tinymars compare SWEEP`: every point of a sweep (its run id, report artifact, folder or report file).

Shows the runs (profile, code, git), which stage artifacts they share, the verdict of every
pre-registered hypothesis (from each run's report `metrics.json`), and every numeric metric the
stages recorded in lineage, with B - A.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from app.common import fail, home_arg, open_lineage, print_table


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="show two runs side by side (stages, hypotheses verdicts, metrics), "
                       "or the points of a sweep")
    p.add_argument("run_a", metavar="RUN_A", help="a run id (a unique prefix works)")
    p.add_argument("run_b", metavar="RUN_B", nargs="?",
                   help="a run id (a unique prefix works); omit it to compare the points of the sweep RUN_A names")
    p.add_argument("--all", action="store_true", help="list every metric, not only those that differ")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    home_arg(p)
    p.set_defaults(handler=cmd_compare)


def _run(lin: Any, ident: str) -> dict[str, Any]:
    kind, run_id = lin.resolve(ident)
    if kind != "run":
        raise KeyError(f"'{ident}' is an artifact, not a run; pass two run ids (see `tinymars runs`)")
    run = lin.query("SELECT run_id, profile_name, profile_hash, code_version, git_sha, git_dirty, status"
                    " FROM runs WHERE run_id = ?", [run_id])[0]
    stages = {s["name"]: s for s in lin.stages(run_id)}
    metrics = {f"{m['name']}.{m['key']}": m["value"] for m in lin.metrics(run_id)}
    verdicts: dict[str, str] = {}
    report = stages.get("report", {}).get("artifact_hash")
    if report:
        path = Path(lin.artifact(report)["path"]) / "metrics.json"
        if path.is_file():
            verdicts = json.loads(path.read_text()).get("hypotheses", {})
    return {"run": run, "stages": stages, "metrics": metrics, "hypotheses": verdicts}


def _short(h: str | None) -> str:
    return (h or "–")[:12]


def compare(a: dict[str, Any], b: dict[str, Any], show_all: bool) -> dict[str, list[dict[str, Any]]]:
    """The side-by-side tables (plain rows, printable or JSON)."""
    runs = [{"field": k, "A": a["run"][k], "B": b["run"][k]} for k in a["run"]]
    names = list(a["stages"]) + [n for n in b["stages"] if n not in a["stages"]]
    stages = []
    for n in names:
        ha, hb = (x["stages"].get(n, {}).get("artifact_hash") for x in (a, b))
        stages.append({"stage": n, "A": _short(ha), "B": _short(hb), "same artifact": ha is not None and ha == hb})
    ids = list(a["hypotheses"]) + [i for i in b["hypotheses"] if i not in a["hypotheses"]]
    hyps = [{"hypothesis": i, "A": a["hypotheses"].get(i, "–"), "B": b["hypotheses"].get(i, "–")} for i in ids]
    metrics = []
    for key in sorted(set(a["metrics"]) | set(b["metrics"])):
        va, vb = a["metrics"].get(key), b["metrics"].get(key)
        if va == vb and not show_all:
            continue
        delta = None if va is None or vb is None else vb - va
        metrics.append({"metric": key, "A": _g(va), "B": _g(vb), "B - A": _g(delta)})
    return {"runs": runs, "stages": stages, "hypotheses": hyps, "metrics": metrics}


def _g(v: float | None) -> str | None:
    return None if v is None else f"{v:.6g}"


def sweep_file(lin: Any, ident: str) -> Path:
    """The sweep.json of a sweep named by its report (file or folder), its run id or its report artifact."""
    path = Path(ident)
    if path.exists():
        found = (path if path.is_dir() else path.parent) / "sweep.json"
        if not found.is_file():
            raise KeyError(f"{path} is not a sweep report (no sweep.json beside it)")
        return found
    kind, ident = lin.resolve(ident)
    if kind == "run":
        rows = lin.query("SELECT s.artifact_hash FROM stages s JOIN runs r USING (run_id) WHERE s.run_id = ? AND"
                         " r.flow = 'sweep' AND s.stage = 'sweep' AND s.artifact_hash IS NOT NULL", [ident])
        if not rows:
            raise KeyError(f"run {ident} is not a finished sweep; pass two run ids to compare iterations")
        ident = rows[0]["artifact_hash"]
    art = lin.artifact(ident)
    if art["kind"] != "sweep":
        raise KeyError(f"artifact {ident[:12]} is a {art['kind']} artifact, not a sweep report")
    return Path(art["path"]) / "sweep.json"


def compare_sweep(lin: Any, sweep: dict[str, Any], show_all: bool) -> dict[str, list[dict[str, Any]]]:
    """One column per point: its overrides, run and verdicts, then every lineage metric that differs."""
    points = sweep["points"]
    runs = [{"point": p["label"], "overrides": "; ".join(p["overrides"]), "run": p["run_id"] or "failed"}
            for p in points]
    ids: list[str] = []
    for p in points:
        ids += [i for i in p["hypotheses"] if i not in ids]
    hyps = [{"hypothesis": i, **{p["label"]: p["hypotheses"].get(i, "–") for p in points}} for i in ids]
    per_point = {p["label"]: {f"{m['name']}.{m['key']}": m["value"] for m in lin.metrics(p["run_id"])}
                 if p["run_id"] else {} for p in points}
    metrics = []
    for key in sorted(set().union(*per_point.values())):
        values = [per_point[p["label"]].get(key) for p in points]
        if len(set(values)) > 1 or show_all:
            metrics.append({"metric": key, **{p["label"]: _g(v) for p, v in zip(points, values, strict=True)}})
    return {"points": runs, "hypotheses": hyps, "metrics": metrics}


def cmd_compare(args: argparse.Namespace) -> int:
    if args.run_b is None:
        return cmd_compare_sweep(args)
    try:
        lin = open_lineage(args.home)
        a, b = _run(lin, args.run_a), _run(lin, args.run_b)
    except (FileNotFoundError, KeyError) as exc:
        return fail(str(exc).strip("'\""))
    return show(compare(a, b, args.all), args, f"A = {a['run']['run_id']}\nB = {b['run']['run_id']}",
                "metrics equal in both runs are hidden")


def cmd_compare_sweep(args: argparse.Namespace) -> int:
    try:
        lin = open_lineage(args.home)
        sweep = json.loads(sweep_file(lin, args.run_a).read_text())
    except (FileNotFoundError, KeyError) as exc:
        return fail(str(exc).strip("'\""))
    return show(compare_sweep(lin, sweep, args.all), args,
                f"sweep {sweep['sweep_run']} of '{sweep['profile']}': {len(sweep['points'])} points",
                "metrics equal in every point are hidden")


def show(tables: dict[str, list[dict]], args: argparse.Namespace, header: str, hidden: str) -> int:
    """Print the comparison tables (or their JSON with --json); say what --all would add."""
    if args.json:
        print(json.dumps(tables, indent=1, default=str))
        return 0
    print(header)
    for title, rows in tables.items():
        print(f"\n{title}:")
        print_table(rows)
    if not args.all:
        print(f"\n({hidden}; --all lists them)")
    return 0
