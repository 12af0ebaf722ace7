"""bench-arch flow: any set of registered architectures, trained in turn on the same packed data for the same budget.

The data comes from the iteration flow stopped at `pack` (so corpus -> pack are cached stages with
lineage, shared with ordinary runs); then one task per model, then the results table, the
loss-vs-time plot (HOME/bench-arch/<run id>/) and the Prefect table artifact `tinymars-bench-arch`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from flows.iteration import iteration
from tasks.bench_arch import bench_model_task, check_inputs, write_results_task
from tinymars.profile import Profile, as_profile

DEFAULT_MODELS = ["native", "baseline", "vocab_graph", "vocab_conv"]


@flow(name="bench-arch", log_prints=True)
def bench_arch(
    profile: str | dict[str, Any] | Profile = "smoke",
    models: list[str | dict[str, Any]] | None = None,
    minutes: float = 1.0,
    home: str = ".tinymars",
    overrides: list[str] | None = None,
    eval_points: int = 4,
) -> dict[str, Any]:
    """Train each model for `minutes` of wall clock on the profile's packed data; returns the table and file paths."""
    log = get_run_logger()
    items = list(models or DEFAULT_MODELS)
    prof = as_profile(profile, overrides)
    check_inputs(prof, items, minutes, eval_points)  # every name resolves and builds before any work starts
    data = iteration(profile=prof, home=home, only="pack")
    pack_hash = next(s["artifact"] for s in data["stages"] if s["name"] == "pack")
    out_dir = str(Path(home) / "bench-arch" / data["run_id"])
    results = [bench_model_task(prof, home, pack_hash, item, minutes * 60.0, eval_points, out_dir) for item in items]
    context = {"profile": prof.name, "minutes": minutes, "pack": pack_hash, "run_id": data["run_id"]}
    written = write_results_task(results, out_dir, context)
    log.info(f"bench-arch: {len(results)} models; results {written['results']}, plot {written['plot']}")
    return {"run_id": data["run_id"], **written}
