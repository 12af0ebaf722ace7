"""The iteration flow: corpus -> channels -> tokenizer -> [replay] -> pack -> train -> steer -> generate -> score
-> report.

Composition only: each task builds or reuses a content-addressed artifact and hands back a
record; this flow process is the only writer of the lineage database.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.deployments import run_deployment
from prefect.runtime import flow_run

from flows.train import handback_path
from tasks.channels import channels_task
from tasks.corpus import corpus_task
from tasks.generate import generate_task
from tasks.pack import pack_task
from tasks.replay import replay_task
from tasks.report import report_task
from tasks.score import score_task
from tasks.steering import steer_applies, steer_task
from tasks.tokenizer import tokenizer_task
from tasks.train import train_task
from tinymars.lineage import Lineage
from tinymars.profile import Profile, as_profile
from tinymars.runinfo import git_state, new_run_id, project_code_version
from tinymars.stages import downstream, last_stage


def dispatch_training(prof: Profile, home: str, pack: dict[str, Any], replay: dict[str, Any] | None,
                      force: bool) -> dict[str, dict[str, Any]]:
    """Run the `train` deployment (an accelerator work pool) and wait; its records come back via `home`."""
    orch = prof.orchestration
    log = get_run_logger()
    log.info(f"dispatching training to deployment '{orch.train_deployment}' and waiting")
    run = run_deployment(  # the validated profile travels as data: the worker's machine needs no profile file
        name=orch.train_deployment,
        parameters={"profile": prof.model_dump(mode="json"), "home": home, "pack": pack, "replay": replay,
                    "force": force},
        timeout=orch.dispatch_timeout_s,
    )
    if run.state is None or not run.state.is_completed():
        state = run.state.name if run.state else "unknown"
        raise RuntimeError(f"train deployment run {run.id} ended in state {state}; see its logs in Prefect")
    records = json.loads(handback_path(home, str(run.id)).read_text())
    for result in records.values():
        result["dispatched_to"] = str(run.id)
    log.info(f"training finished on deployment run {run.id} ({run.name})")
    return records


class StopAfter(Exception):
    """Raised (and caught) to end a run early at `--only STAGE`."""


@flow(name="iteration", log_prints=True)
def iteration(
    profile: str | dict[str, Any] | Profile,
    home: str = ".tinymars",
    refresh: list[str] | None = None,
    overrides: list[str] | None = None,
    only: str | None = None,
) -> dict[str, Any]:
    """Run one experiment iteration; every stage is cached by code + profile section + input hashes.

    `profile`: a validated Profile (what `tinymars run` passes), a profile's data, or a shipped name /
    YAML path with `overrides` (a deployment's parameters)."""
    log = get_run_logger()
    prof = as_profile(profile, overrides)
    forced = downstream(refresh or [])  # `eval` (the former stage) stands for generate + score
    only = last_stage(only) if only is not None else None
    lineage = Lineage(Path(home) / "lineage.duckdb")
    run_id = new_run_id()
    sha, dirty = git_state()
    lineage.start_run({
        "run_id": run_id, "flow": "iteration", "profile_name": prof.name, "profile_hash": prof.hash(),
        "profile_json": json.dumps(prof.model_dump(mode="json"), sort_keys=True),
        "code_version": project_code_version(), "git_sha": sha, "git_dirty": dirty,
        "prefect_flow_run_id": str(flow_run.get_id() or ""), "refresh": sorted(forced),
    })
    log.info(f"run {run_id}: profile '{prof.name}', home {home}" + (f", refresh {sorted(forced)}" if forced else ""))
    results: list[dict[str, Any]] = []

    def step(name: str, task: Any, *args: Any, **keywords: Any) -> dict[str, Any]:
        stage = name.split(":")[0]
        t0 = time.perf_counter()
        try:
            result = task(prof, home, *args, force=stage in forced, **keywords)
        except BaseException as exc:
            lineage.record_stage(run_id, {
                "stage": stage, "name": name, "status": "failed", "duration_s": time.perf_counter() - t0,
                "error": f"{type(exc).__name__}: {exc}"[:2000],
                # a stage that fails after paying (budget stop, crash) still hands its calls back
                "teacher_calls": getattr(exc, "teacher_calls", []),
            })
            raise
        return record(result)

    def record(result: dict[str, Any]) -> dict[str, Any]:
        lineage.record_stage(run_id, result)
        results.append(result)
        return result

    def stop_after(stage: str) -> None:
        if only == stage:
            log.info(f"--only {stage}: stopping after it")
            raise StopAfter

    try:
        corpus = step("corpus", corpus_task)
        stop_after("corpus")
        channels = step("channels", channels_task, corpus)
        stop_after("channels")
        tokenizer = step("tokenizer", tokenizer_task, corpus)
        stop_after("tokenizer")
        replay = step("replay", replay_task, tokenizer) if prof.replay is not None else None
        stop_after("replay")
        pack = step("pack", pack_task, corpus, channels, tokenizer)
        stop_after("pack")
        if prof.orchestration.train_dispatch == "deployment":
            trained = dispatch_training(prof, home, pack, replay, "train" in forced)
            for result in trained.values():
                record(result)
        else:
            from tasks.train import trainer_slots

            slots = trainer_slots(prof)  # models.fanout: [] = one model at a time (one device, or CPU)
            if not slots:
                trained = {spec.name: step(f"train:{spec.name}", train_task, pack, spec, replay)
                           for spec in prof.train.models}
            else:  # Prefect's task runner trains model i on slot i mod len(slots), after the one before it there
                from prefect import allow_failure
                from prefect.futures import as_completed

                log.info(f"training {len(prof.train.models)} models, {len(slots)} at a time: "
                         + "; ".join(slot.describe() for slot in slots))
                futures: dict[str, Any] = {}
                for i, spec in enumerate(prof.train.models):
                    before = list(futures.values())[i - len(slots)] if i >= len(slots) else None
                    futures[spec.name] = train_task.with_options(task_run_name=f"train:{spec.name}").submit(
                        prof, home, pack, spec, replay, force="train" in forced, slot=slots[i % len(slots)],
                        wait_for=[allow_failure(before)] if before is not None else None)
                names = {future.task_run_id: name for name, future in futures.items()}
                done, failure = {}, None
                for future in as_completed(list(futures.values())):  # recorded as each ends: the flow is the writer
                    name = names[future.task_run_id]
                    try:  # step records the result, or the error, of a run that already happened
                        done[name] = step(f"train:{name}", lambda *_, future=future, **__: future.result())
                    except Exception as exc:
                        failure = failure or exc
                if failure is not None:
                    raise failure
                trained = {name: done[name] for name in futures}
        stop_after("train")
        steer = step("steer", steer_task, corpus, tokenizer, trained) if steer_applies(prof) else None
        stop_after("steer")
        generation = step("generate", generate_task, corpus, channels, tokenizer, pack, trained, steer)
        # eval.models (the organ experiment): every other evaluated native gets its own generate:<name>
        others = {name: step(f"generate:{name}", generate_task, corpus, channels, tokenizer, pack, trained, steer,
                             model=name) for name in prof.evaluated_models()[1:]}
        stop_after("generate")
        scored = step("score", score_task, generation)
        for name, other in others.items():
            step(f"score:{name}", score_task, other, model=name)
        stop_after("score")
        report = step("report", report_task, corpus, pack, trained, scored, steer,
                      *([generation, others] if others else []))
    except StopAfter:
        report = None
    except BaseException as exc:
        lineage.finish_run(run_id, "failed", f"{type(exc).__name__}: {exc}"[:2000])
        raise
    lineage.finish_run(run_id, "completed")
    hits = sum(r["cache_hit"] for r in results)
    report_path = str(Path(report["artifact"]["path"]) / "report.md") if report else None
    log.info(f"run {run_id} completed: {hits}/{len(results)} stages from cache; report: {report_path}")
    return {
        "run_id": run_id,
        "report": report_path,
        "stages": [{"name": r["name"], "cache_hit": r["cache_hit"], "duration_s": round(r["duration_s"], 3),
                    "artifact": r["artifact"]["content_hash"]} for r in results],
    }
