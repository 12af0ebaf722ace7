"""Deployments on a real Prefect server with real process workers (issue: deployments & dispatch).

Starts `prefect server start` on 127.0.0.1 and workers for the CPU and accelerator pools, runs
`tinymars deploy`, triggers deployments through the REST API and checks lineage, Prefect
artifacts and schedules; every process is stopped at the end.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from deploy.local import BIN, LocalPrefect
from tinymars.lineage import Lineage
from tinymars.profile import load_profile
from tinymars.stages import ORDER

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    base = tmp_path_factory.mktemp("deploy")
    home = base / "home"
    local = LocalPrefect(base / "prefect-home", base / "logs", {"TINYMARS_HOME": str(home)})
    try:
        local.start_server()
        out = subprocess.run([str(BIN / "tinymars"), "deploy", "--home", str(home)], env=local.env, cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "iteration/iteration" in out.stdout and "train/train" in out.stdout
        local.start_worker("tinymars-cpu")
        local.start_worker("tinymars-accel")
        yield local, home
    finally:
        local.stop()
        logs = base / "logs"
        assert all(p.poll() is not None for p in local.procs), "no process may be left behind"
        if logs.exists():
            for f in logs.iterdir():
                print(f"--- {f.name}\n{f.read_text(errors='replace')[-3000:]}")


def _stages(home: Path, run_id: str) -> dict[str, dict]:
    return {s["name"]: s for s in Lineage(home / "lineage.duckdb").stages(run_id)}


def _latest_run(home: Path) -> str:
    return Lineage(home / "lineage.duckdb").runs(1)[0]["run_id"]


def test_deployed_iteration_then_cached_rerun(stack):
    local, home = stack
    params = {"profile": "tiny", "home": str(home)}
    run = local.run_deployment("iteration/iteration", params)
    assert run["state"]["type"] == "COMPLETED", run["state"]
    stages = _stages(home, _latest_run(home))
    # train runs once per model; replay only with a replay section (tiny has none)
    expected = len(ORDER) - 2 + len(load_profile("tiny").train.models)
    assert len(stages) == expected and not any(s["cache_hit"] for s in stages.values())
    arts = local.post("/artifacts/filter", {"artifacts": {"key": {"any_": ["tinymars-report"]}}})
    assert arts and "MARS vs ABLATED" in arts[0]["data"]

    again = local.run_deployment("iteration/iteration", params)
    assert again["state"]["type"] == "COMPLETED"
    stages = _stages(home, _latest_run(home))
    assert len(stages) == expected and all(s["cache_hit"] for s in stages.values())


def test_training_dispatched_to_the_train_deployment(stack):
    local, home = stack
    params = {"profile": "tiny", "home": str(home), "refresh": ["train"],
              "overrides": ["orchestration.train_dispatch=deployment"]}
    run = local.run_deployment("iteration/iteration", params)
    assert run["state"]["type"] == "COMPLETED", run["state"]
    stages = _stages(home, _latest_run(home))
    assert not stages["train:native"]["cache_hit"] and not stages["train:baseline"]["cache_hit"]
    train_dep = local.deployment("train/train")
    runs = local.post("/flow_runs/filter", {"deployments": {"id": {"any_": [train_dep["id"]]}}})
    assert [r["state"]["type"] for r in runs] == ["COMPLETED"]
    assert runs[0]["parent_task_run_id"], "the train run is linked to the iteration as a subflow"
    assert train_dep["concurrency_limit"] == 1 or train_dep.get("global_concurrency_limit", {}).get("limit") == 1


def test_schedules_from_yaml_are_registered(stack):
    local, _ = stack
    smoke = local.deployment("iteration/smoke")
    (sched,) = smoke["schedules"]
    assert sched["schedule"]["cron"] == "0 2 * * *" and sched["active"] is True
    (weekly,) = local.deployment("iteration/iteration")["schedules"]
    assert weekly["schedule"]["cron"] == "0 3 * * 1" and weekly["active"] is False
    assert local.deployment("benchmark/benchmark")["work_pool_name"] == "tinymars-cpu"
    assert local.deployment("train/train")["work_pool_name"] == "tinymars-accel"
    sweep = local.deployment("sweep/sweep")
    assert sweep["work_pool_name"] == "tinymars-cpu" and sweep["parameters"]["vary"] == {"train.lr": [1e-3, 3e-3]}
    for name in ("organ", "adapter"):  # the iteration flow with that shipped profile
        dep = local.deployment(f"iteration/{name}")
        assert dep["parameters"]["profile"] == name and dep["work_pool_name"] == "tinymars-cpu"
    # teacher calls of every run share one global concurrency limit (tasks/corpus.py acquires it)
    assert local.get("/v2/concurrency_limits/tinymars-teacher")["limit"] == 32


def test_serve_registers_served_deployments_and_stops_cleanly(stack, tmp_path):
    """`tinymars serve` (one box, no worker): its deployments appear with their schedules."""
    import os
    import signal
    import time

    local, home = stack
    before = local.deployment("iteration/smoke")["updated"]
    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen([str(BIN / "tinymars"), "serve", "--home", str(home), "--only", "smoke"],
                            env=local.env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        served = None
        while time.monotonic() < deadline and proc.poll() is None:
            dep = local.deployment("iteration/smoke")
            if dep["updated"] != before:  # upserted by the serving process
                served = dep
                break
            time.sleep(1)
        assert served is not None, (tmp_path / "serve.log").read_text()
        assert served["schedules"][0]["schedule"]["cron"] == "0 2 * * *"
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        log.close()
    assert proc.poll() is not None
