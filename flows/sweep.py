"""The sweep flow: one `iteration` subflow run per grid point, every unchanged stage built once and shared.

Sharing falls out of content-addressed caching; what this flow adds is order. A point waits for the
earliest point that builds a stage they share (tinymars.sweep.waits_for), so two concurrent points never
build one artifact twice, and lineage shows each shared stage built once and reused by the other points.
With `max_parallel` > 1 the stages every point shares are built first by one `--only` prefix run of the
first point (so the points can then start together); with 1 (the default) the points simply run in order.
The sweep report (tasks/sweep_report.py) is this flow's own lineage run (flow `sweep`), whose report
artifact names every point's run id and has every point's report as a parent.
"""

from __future__ import annotations

import itertools
import json
import threading
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from flows.iteration import iteration
from tasks.sweep_report import sweep_report_task
from tinymars.lineage import Lineage
from tinymars.profile import Profile, as_profile
from tinymars.runinfo import git_state, new_run_id, project_code_version
from tinymars.stages import ORDER
from tinymars.sweep import check_vary, grid_points, point_label, point_overrides, shared_stages, waits_for


def trains_on_accelerator(prof: Profile) -> bool:
    """Whether a point trains on a local GPU/TPU (points then run one at a time: no device is shared by two
    trainings). Dispatched training queues on the `train` deployment (concurrency_limit 1), so it does not."""
    if prof.orchestration.train_dispatch == "deployment":
        return False
    if prof.train.device == "auto":
        import torch

        return torch.cuda.is_available()
    return prof.train.device != "cpu"


def point_profiles(base: Profile, vary: dict[str, list[Any]]) -> list[tuple[dict[str, Any], Profile]]:
    """Every grid point with its validated profile (the base profile's data with the point's --set values)."""
    data = base.model_dump(mode="json")
    return [(point, as_profile(data, point_overrides(point))) for point in grid_points(vary)]


# Running points per sweep (its lineage run id -> a semaphore of max_parallel slots); a point takes a slot
# once the points it waits for have ended.
_SLOTS: dict[str, threading.Semaphore] = {}


@task(name="sweep-point", cache_policy=NO_CACHE)
def sweep_point(prof: Profile, home: str, label: str, slots: str) -> dict[str, Any]:
    """One point as an `iteration` subflow run (inside a task, so points can be submitted concurrently)."""
    with _SLOTS[slots]:
        return iteration.with_options(flow_run_name=label)(profile=prof, home=home)


@flow(name="sweep", log_prints=True)
def sweep(
    profile: str | dict[str, Any] | Profile,
    home: str = ".tinymars",
    vary: dict[str, list[Any]] | None = None,
    overrides: list[str] | None = None,
    max_parallel: int | None = None,
) -> dict[str, Any]:
    """Run the grid `vary` (default: the profile's `sweep.vary`) over the profile; write the sweep report.

    `max_parallel` (default: the profile's `sweep.max_parallel`, else 1): points running at once. Each
    point's training takes the devices its profile gives it (train.devices, train.parallel_models), so on
    an accelerator keep 1 unless the devices can hold several trainings at once."""
    log = get_run_logger()
    base = as_profile(profile, overrides)
    vary = check_vary(vary if vary is not None else (base.sweep.vary if base.sweep else None))
    parallel = max_parallel or (base.sweep.max_parallel if base.sweep else 1)
    points = point_profiles(base, vary)  # every point validated before any work
    if parallel > 1 and any(trains_on_accelerator(p) for _, p in points):
        log.warning(f"max_parallel {parallel} -> 1: the points train on this machine's accelerator and each "
                    "training already takes every device its profile gives it (train.devices, parallel_models); "
                    "set orchestration.train_dispatch: deployment to queue trainings on the train pool instead")
        parallel = 1
    labels = [f"point-{i}" for i in range(len(points))]
    lineage = Lineage(Path(home) / "lineage.duckdb")
    run_id = new_run_id()
    sha, dirty = git_state()
    lineage.start_run({
        "run_id": run_id, "flow": "sweep", "profile_name": base.name, "profile_hash": base.hash(),
        "profile_json": json.dumps({"profile": base.model_dump(mode="json"), "vary": vary}, sort_keys=True),
        "code_version": project_code_version(), "git_sha": sha, "git_dirty": dirty,
        "prefect_flow_run_id": str(flow_run.get_id() or ""),
    })
    log.info(f"sweep {run_id}: {len(points)} points over {', '.join(vary)}, {parallel} at a time")
    try:
        outcomes, prefix_run = _run_points(points, labels, home, parallel, run_id)
        report = sweep_report_task(base, home, run_id, vary, prefix_run, [
            {"label": label, "overrides": point_overrides(point), "describe": point_label(point), **outcome}
            for label, (point, _), outcome in zip(labels, points, outcomes, strict=True)])
        lineage.record_stage(run_id, report)
    except BaseException as exc:
        lineage.finish_run(run_id, "failed", f"{type(exc).__name__}: {exc}"[:2000])
        raise
    failed = [o for o in outcomes if o["error"]]
    lineage.finish_run(run_id, "failed" if failed else "completed",
                       f"{len(failed)} of {len(points)} points failed" if failed else None)
    path = str(Path(report["artifact"]["path"]) / "report.md")
    log.info(f"sweep {run_id}: {len(points) - len(failed)}/{len(points)} points completed; report: {path}")
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(points)} sweep points failed (first: {failed[0]['error']}); "
                           f"the sweep report lists them: {path}")
    return {"run_id": run_id, "report": path, "points": outcomes}


def _run_points(points: list[tuple[dict[str, Any], Profile]], labels: list[str], home: str, parallel: int,
                sweep_run: str) -> tuple[list[dict[str, Any]], str | None]:
    """Each point's iteration outcome ({run_id, report, stages, error}), in grid order, and the run id of the
    shared-prefix run (None without one); a failed point does not stop the others."""
    log = get_run_logger()
    grid = [point for point, _ in points]
    if parallel <= 1 or len(points) == 1:
        outcomes = []
        for label, (_, prof) in zip(labels, points, strict=True):
            try:
                outcomes.append(_outcome(iteration.with_options(flow_run_name=label)(
                    profile=prof, home=home)))
            except Exception as exc:
                log.error(f"{label} failed: {type(exc).__name__}: {exc}")
                outcomes.append(_outcome(None, exc))
        return outcomes, None
    from prefect import allow_failure
    from prefect.futures import wait

    shared = shared_stages(grid)
    built: set[str] = set()
    prefix_run = None
    prefix = list(itertools.takewhile(shared.__contains__, ORDER))  # what `--only` can stop after
    if prefix:  # one prefix run builds what every point shares; then the points can start together
        log.info(f"building the stages every point shares ({', '.join(prefix)}) once, then the points")
        prefix_run = iteration.with_options(flow_run_name="shared-prefix")(
            profile=points[0][1], home=home, only=prefix[-1])["run_id"]
        built = set(prefix)
    deps = waits_for(grid, skip=built)
    _SLOTS[sweep_run] = threading.Semaphore(parallel)
    try:
        futures: list[Any] = []
        for i, ((_, prof), label) in enumerate(zip(points, labels, strict=True)):
            futures.append(sweep_point.with_options(task_run_name=label).submit(
                prof, home, label, sweep_run, wait_for=[allow_failure(futures[b]) for b in sorted(deps[i])]))
        wait(futures)
    finally:
        _SLOTS.pop(sweep_run, None)
    outcomes = []
    for label, future in zip(labels, futures, strict=True):
        try:
            outcomes.append(_outcome(future.result()))
        except Exception as exc:
            log.error(f"{label} failed: {type(exc).__name__}: {exc}")
            outcomes.append(_outcome(None, exc))
    return outcomes, prefix_run


def _outcome(result: dict[str, Any] | None, exc: BaseException | None = None) -> dict[str, Any]:
    if result is None:
        return {"run_id": None, "report": None, "stages": [], "error": f"{type(exc).__name__}: {exc}"[:500]}
    return {"run_id": result["run_id"], "report": result["report"], "stages": result["stages"], "error": None}
