"""The sweep report: one row per grid point (its overrides, run, verdicts, headline metrics, report) and
which stages the points built or shared, as an artifact (`sweep/<key>/`: sweep.json, report.md,
report.html in the iteration report's style).

The artifact names the points' run ids, so each sweep gets its own; its lineage parents are the points'
report artifacts. `tinymars compare SWEEP` reads sweep.json.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.report_html import render_html
from tinymars.artifacts import ArtifactStore, code_version, stage_key, verify, write_atomic
from tinymars.profile import Profile

STAGE = "sweep"
SOURCES = (Path(__file__), Path(__file__).with_name("report_html.py"))


def headline(metrics: dict[str, Any]) -> dict[str, float]:
    """The few numbers a sweep row shows: held-out losses (channels zeroed per model, and each model's
    validation loss) and the native's gate norm; every figure stays in the point's own report."""
    out = {k: v for k, v in metrics.get("eval", {}).items()
           if k.startswith("relief.") and k.endswith("zeroed_nats") or k == "gates.alpha_l2"}
    for name, values in metrics.get("models", {}).items():
        for k, v in values.items():
            if "val_loss" in k and isinstance(v, int | float):
                out[f"{name}.{k}"] = v
    return out


def point_rows(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each point with its report's verdicts and headline metrics (a failed point: its error)."""
    rows = []
    for p in points:
        row = {"label": p["label"], "overrides": p["overrides"], "run_id": p["run_id"], "report": p["report"],
               "error": p["error"], "hypotheses": {}, "metrics": {}, "report_hash": None}
        if p["report"]:
            folder = Path(p["report"]).parent
            metrics = json.loads((folder / "metrics.json").read_text())
            row |= {"hypotheses": metrics.get("hypotheses", {}), "metrics": headline(metrics),
                    "report_hash": verify(folder).content_hash}
        row["stages"] = {s["name"]: {"cache_hit": s["cache_hit"], "artifact": s["artifact"]} for s in p["stages"]}
        rows.append(row)
    return rows


def sharing(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per stage: how many points built it and how many reused a cached artifact, and how many artifacts."""
    names: list[str] = []
    for r in rows:
        names += [n for n in r["stages"] if n not in names]
    return [{"stage": n,
             "built": sum(1 for r in rows if n in r["stages"] and not r["stages"][n]["cache_hit"]),
             "cache hits": sum(1 for r in rows if r["stages"].get(n, {}).get("cache_hit")),
             "artifacts": len({r["stages"][n]["artifact"] for r in rows if n in r["stages"]})} for n in names]


def _fmt(v: Any) -> str:
    return "–" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(_fmt(c).replace("|", "\\|") for c in r) + " |" for r in rows])


def render(title: str, sweep_run: str, vary: dict[str, list[Any]], rows: list[dict[str, Any]],
           prefix_run: str | None = None) -> str:
    hyps: list[str] = []
    mets: list[str] = []
    for r in rows:
        hyps += [h for h in r["hypotheses"] if h not in hyps]
        mets += [m for m in r["metrics"] if m not in mets]
    lines = [f"# {title}", "", f"Sweep run `{sweep_run}`: {len(rows)} points over "
             + ", ".join(f"`{k}` in {json.dumps(v)}" for k, v in vary.items()) + ".", "",
             "## Points and verdicts", ""]
    lines += _table(["point", "overrides", "run", *hyps],
                    [[r["label"], "; ".join(f"`{o}`" for o in r["overrides"]), r["run_id"] or "failed",
                      *(r["hypotheses"].get(h, "–") for h in hyps)] for r in rows])
    if mets:
        lines += ["", "## Headline metrics", ""]
        lines += _table(["point", *mets], [[r["label"], *(r["metrics"].get(m) for m in mets)] for r in rows])
    lines += ["", "## Stages: built once, shared by the others", ""]
    if prefix_run:
        lines += [f"The stages every point shares were built first by the shared-prefix run `{prefix_run}` "
                  "(`--only`), so every point reads them from cache.", ""]
    lines += _table(["stage", "built", "cache hits", "artifacts"],
                    [[s["stage"], s["built"], s["cache hits"], s["artifacts"]] for s in sharing(rows)])
    lines += ["", "## Reports", ""]
    lines += [f"- {r['label']}: `{r['report']}`" if r["report"] else f"- {r['label']}: failed: {r['error']}"
              for r in rows]
    return "\n".join(lines) + "\n"


@task(name="sweep-report", cache_policy=NO_CACHE)
def sweep_report_task(profile: Profile, home: str, sweep_run: str, vary: dict[str, list[Any]],
                      prefix_run: str | None, points: list[dict[str, Any]]) -> dict[str, Any]:
    """Build the sweep report artifact and hand back its lineage record (the flow writes it)."""
    t0 = time.perf_counter()
    rows = point_rows(points)
    inputs = {r["label"]: r["report_hash"] for r in rows if r["report_hash"]}
    section = {"sweep_run": sweep_run, "prefix_run": prefix_run, "vary": vary,
               "points": [[r["label"], r["run_id"]] for r in rows]}
    key = stage_key(STAGE, code_version(SOURCES), section, inputs)
    store = ArtifactStore(Path(home) / "artifacts")
    title = f"Sweep of '{profile.name}'"

    def build(out: Path) -> dict[str, Any]:
        markdown = render(title, sweep_run, vary, rows, prefix_run)
        write_atomic(out / "sweep.json", json.dumps(
            {"sweep_run": sweep_run, "prefix_run": prefix_run, "profile": profile.name, "vary": vary, "points": rows,
             "sharing": sharing(rows)}, indent=1, sort_keys=True, default=str))
        write_atomic(out / "report.md", markdown)
        if profile.report.html:
            write_atomic(out / "report.html", render_html(title, markdown))
        return {"rows": len(rows), "meta": {"sweep_run": sweep_run, "points": [r["run_id"] for r in rows]}}

    artifact = store.lookup(STAGE, key) or store.build(STAGE, key, build, inputs=inputs)
    return {"stage": STAGE, "name": "sweep-report", "key": key, "cache_hit": False, "status": "completed",
            "error": None, "duration_s": time.perf_counter() - t0, "artifact": artifact.to_dict(),
            "inputs": inputs, "metrics": [], "teacher_calls": []}
