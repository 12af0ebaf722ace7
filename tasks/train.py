"""Train stage: one model (native, baseline or adapter) on the packed shards; one cached artifact per model.

Training runs in a child process (`python -m models.train_cli`, under torchrun when the profile asks
for more than one device) whose progress lines are streamed into this task's log. Checkpoints go
to `HOME/checkpoints/<stage key>/`, held under an exclusive lock while a trainer runs. A killed or
failed attempt leaves them there, and the next attempt at the same key (a Prefect retry or a rerun)
resumes from the newest one that verifies; they are deleted once the model is built.

With several accelerators the iteration flow trains the models at the same time, one device group each
(`trainer_slots`, models.fanout): a task given a `slot` launches its trainer on the slot's processes, with
the slot's environment (CUDA_VISIBLE_DEVICES, OMP_NUM_THREADS). A slot changes where a model trains, not
what it computes, so it is in no key.

Why not inside the artifact's build folder: the store deletes a build folder when its builder
raises (so a failed attempt's checkpoints would be gone before the retry), and build folders have
random names. The stage key names exactly the same inputs (code, profile section, pack hash),
so a checkpoint under it can only continue the same computation, and the lock keeps two runs off it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from models.fanout import TrainerSlot, plan_slots
from tasks.common import ROOT, artifact_of, logger, run_stage, stage_code_version, stage_progress
from tinymars.artifacts import ArtifactStore, stage_key, write_atomic
from tinymars.profile import ModelSpec, Profile
from tinymars.progress import ProgressCallback

# Wall-clock fields of the trainer's per-step records: they differ between two runs that train the
# very same weights, so they go to a volatile file (verified, outside the content hash; see
# tinymars.artifacts) and metrics.jsonl keeps only what the inputs determine.
TIMING_FIELDS = ("tok_per_s", "mfu", "train_s")
TIMING_FILE = "timing.jsonl"


def split_wall_clock(out: Path) -> None:
    """Move the wall-clock fields of out/metrics.jsonl into out/timing.jsonl (one line per logged step)."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    timing = [{"step": r["step"], **{k: r[k] for k in TIMING_FIELDS if k in r}} for r in records]
    (out / "metrics.jsonl").write_text("".join(
        json.dumps({k: v for k, v in r.items() if k not in TIMING_FIELDS}) + "\n" for r in records))
    (out / TIMING_FILE).write_text("".join(json.dumps(r) + "\n" for r in timing))


# The trainer's step line (models.trainer.Trainer.write_metrics): "step 4/12 loss 6.883 lr ... tok/s 14,146 ..."
STEP_LINE = re.compile(r"^step (\d+)/(\d+) loss (\S+) .*?tok/s ([\d,.]+)")


def follow_steps(line: str, progress: ProgressCallback) -> None:
    """Move the training bar when `line` is one of the trainer's step lines (anything else is ignored)."""
    match = STEP_LINE.match(line)
    if match is None:
        return
    step, steps, loss, tok_s = match.groups()
    try:
        progress(int(step), int(steps), loss=float(loss), tok_s=float(tok_s.replace(",", "")))
    except ValueError:  # a nan loss prints as "nan" (a float); anything stranger is not worth a crash
        return


@contextlib.contextmanager
def exclusive(lock_path: Path, log: Any) -> Iterator[None]:
    """Hold an exclusive flock (released by the OS if this process dies); wait if another run holds it."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info(f"another run is training into {lock_path.parent}; waiting for it")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def trainer_slots(profile: Profile) -> list[TrainerSlot]:
    """The device groups this machine gives the profile's concurrent trainers ([]: one model at a time)."""
    from models.distributed import cpu_cores, resolve_kind, visible_accelerators

    t = profile.train
    kind = resolve_kind(t.device)
    return plan_slots(len(t.models), kind, t.parallel_models, t.devices, visible_accelerators(kind), cpu_cores(),
                      t.batch_size, t.grad_accum)


@task(name="train", cache_policy=NO_CACHE, retries=1)
def train_task(
    profile: Profile, home: str, pack: dict[str, Any], spec: ModelSpec, replay: dict[str, Any] | None = None,
    force: bool = False, slot: TrainerSlot | None = None,
) -> dict[str, Any]:
    pack_art = artifact_of(pack)
    meta = json.loads(pack_art.file("pack.json").read_text())
    from models.sizing import profile_specs

    registry_spec = profile_specs(profile, meta)[spec.name]  # bracketing baselines sized against the native
    section = {"train": profile.train.shared(), "model": registry_spec}
    inputs = {"pack": pack_art}
    if replay is not None:  # the replay tokens and the share of windows they fill
        inputs["replay"] = artifact_of(replay)
        section["replay_share"] = profile.replay.share
    # the same key run_stage computes: checkpoints under it can only belong to this very build
    key = stage_key("train", stage_code_version("train"), section, {k: a.content_hash for k, a in inputs.items()})
    work = Path(home) / "checkpoints" / key

    def build(out: Path) -> dict[str, Any]:
        from models.distributed import default_nproc, resolve_kind
        from models.launch import launch_command, run_streaming
        from models.train_cli import make_job

        t = profile.train
        log = logger()
        kind = resolve_kind(t.device)
        nproc = slot.nproc if slot is not None else default_nproc(t.device) if t.devices == "auto" else t.devices
        job = make_job(t.recipe(), kind, nproc, registry_spec, Path(pack_art.path), meta, out, work, t.resume)
        if replay is not None:
            job["data"]["replay"] = {"dir": inputs["replay"].path, "share": profile.replay.share,
                                     "manifest": inputs["replay"].meta["replay"]}
        with exclusive(work / "lock", log):
            done = None if force else ArtifactStore(Path(home) / "artifacts").lookup("train", key)
            if done is not None:  # a concurrent run trained this very key while we waited: adopt, don't retrain
                log.info(f"[train:{spec.name}] another run finished this model while we waited; reusing it")
                for name in done.files:
                    (out / name).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(done.file(name), out / name)
                return {"meta": done.meta, "volatile": done.volatile}
            (work / "result.json").unlink(missing_ok=True)
            if force:  # a forced rebuild recomputes from scratch, whatever an earlier attempt left
                shutil.rmtree(work / "ckpt", ignore_errors=True)
            write_atomic(work / "job.json", json.dumps(job, indent=1, sort_keys=True))
            cmd = launch_command(work / "job.json", nproc, kind)
            where = f" ({slot.describe()})" if slot is not None else ""
            log.info(f"[train:{spec.name}] {spec.arch} on {nproc} x {kind}{where}: {' '.join(cmd[1:])}")
            with stage_progress(f"[train:{spec.name}] steps", t.steps, "step") as progress:
                def on_line(line: str) -> None:
                    log.info(f"[train:{spec.name}] {line}")
                    follow_steps(line, progress)

                code, tail = run_streaming(cmd, on_line, cwd=ROOT, env=slot.env if slot is not None else None)
            if code != 0:
                raise RuntimeError(f"training '{spec.name}' exited with code {code}; checkpoints (if any) are kept "
                                   f"in {work} for the retry. Last output:\n" + "\n".join(tail[-15:]))
            summary = json.loads((work / "result.json").read_text())
            shutil.rmtree(work / "ckpt", ignore_errors=True)  # only ever needed to resume this build
        split_wall_clock(out)
        metrics = {k: v for k, v in summary.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        sec_per_step = summary.get("timing", {}).get("sec_per_step")
        if sec_per_step:  # wall-clock: lives in lineage and the manifest, never in the hashed files
            metrics["sec_per_step"] = sec_per_step
            metrics["tok_per_s"] = summary["timing"]["tok_per_s"]  # real tokens (models.trainer), not padding
        return {"meta": {"metrics": metrics, "model": spec.name, "arch": spec.arch,
                         "devices": nproc, "device": summary.get("timing", {}).get("device")},
                "volatile": [TIMING_FILE]}

    return run_stage("train", home, section, inputs, build, force, name=f"train:{spec.name}")
