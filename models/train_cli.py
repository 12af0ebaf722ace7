"""`python -m models.train_cli JOB.json`: train one model from a job file (what the train task launches).

Runs as one process, under torchrun (one process per GPU or CPU rank), or on XLA where it starts
one process per device itself. Rank 0 prints progress lines to stdout (the task streams them into
the Prefect logs) and writes the summary to `job["result"]`. The job file (JSON):

    {"spec": {registry spec}, "build": {"vocab_size", "seq_len", "channel_names", "channel_dim", "seed"},
     "data": {"train": [shards], "heldout": [shards], "channel_dim": D, "pad_id": 0},
     "recipe": {tinymars.profile.TrainRecipe, as JSON}, "nproc": 1, "out_dir": "...", "ckpt_dir": "..." | null,
     "resume": true, "result": ".../result.json"}
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

from models.distributed import die_with_parent, setup
from models.launch import LAUNCHER_PID_ENV
from tinymars.profile import TrainRecipe


def make_job(recipe: TrainRecipe, kind: str, nproc: int, spec: dict[str, Any], pack_dir: Path,
             pack_meta: dict[str, Any], out_dir: Path, work: Path, resume: bool) -> dict[str, Any]:
    """The job file for one model: the recipe as is (device resolved to `kind`), the model spec, the packed
    shards, and where the model, checkpoints (`work/ckpt`) and summary (`work/result.json`) go."""
    def shards(split: str) -> list[str]:
        return [str(pack_dir / name) for name in pack_meta["shards"][split]]

    return {"spec": spec,
            "build": {k: pack_meta[k] for k in ("vocab_size", "seq_len", "channel_names", "channel_dim")}
            | {"seed": recipe.seed},
            "data": {"train": shards("train"), "heldout": shards("heldout"), "channel_dim": pack_meta["channel_dim"],
                     "pad_id": pack_meta["pad_id"], "bos_id": pack_meta.get("bos_id")},
            "recipe": recipe.model_copy(update={"device": kind}).model_dump(mode="json"), "nproc": nproc,
            "out_dir": str(out_dir), "ckpt_dir": str(work / "ckpt"), "resume": resume,
            "result": str(work / "result.json")}


def watch_launcher(interval_s: float = 1.0) -> None:
    """Exit when the launching process is gone, even under torchrun (whose workers it did not fork)."""
    die_with_parent()
    pid = int(os.environ.get(LAUNCHER_PID_ENV, "0"))
    if pid <= 0:
        return

    def watch() -> None:
        while True:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                os._exit(137)
            except PermissionError:
                pass
            time.sleep(interval_s)

    threading.Thread(target=watch, name="launcher-watch", daemon=True).start()


def run_job(job: dict[str, Any]) -> dict[str, Any] | None:
    """Train the job's model on this process's device and rank; rank 0 returns (and writes) the summary."""
    import torch

    from models.architectures import build, count_params
    from models.controls import apply_channel_control
    from models.data import load_split
    from models.trainer import train
    from tinymars.artifacts import write_atomic

    cfg = TrainRecipe.model_validate(job["recipe"])
    rt = setup(cfg.device, cfg.precision)
    try:
        log = (lambda line: print(line, flush=True)) if rt.is_main else (lambda _: None)
        b, data = job["build"], job["data"]
        model = build(job["spec"], vocab_size=b["vocab_size"], seq_len=b["seq_len"],
                      channel_names=b["channel_names"], channel_dim=b["channel_dim"], seed=b.get("seed"))
        train_rows = apply_channel_control(load_split(data["train"], channel_dim=data["channel_dim"]), cfg)
        held = load_split(data["heldout"], channel_dim=data["channel_dim"]) if data.get("heldout") else None
        if held is not None:
            from models.data import sample_rows

            held = sample_rows(held, cfg.eval_rows, cfg.seed)  # a rehearsal on a CPU reads a few
        extra = f", frozen base {model.base_params():,}" if hasattr(model, "base_params") else ""
        log(f"{job['spec']['arch']} {count_params(model):,} trainable parameters{extra}; {cfg.steps} steps of "
            f"{cfg.batch_size} rows on {rt.world} x {rt.device_name} ({'bf16' if rt.bf16 else 'fp32'}, "
            f"{torch.get_num_threads()} CPU threads per process)")
        replay, share = None, 0.0
        if data.get("replay"):  # language-model replay windows (tasks/replay.py) at a share of the batch
            from models.data import ReplayWindows

            r = data["replay"]
            replay = ReplayWindows(r["dir"], r["manifest"], b["seq_len"], data["bos_id"], cfg.seed)
            share = float(r["share"])
            log(f"replay: {share:.1%} of the windows from {r['manifest']['tokens']:,} replay tokens "
                f"({len(replay):,} windows of {b['seq_len']})")
        summary = train(model, train_rows, held, cfg, Path(job["out_dir"]), data["pad_id"], log, runtime=rt,
                        ckpt_dir=Path(job["ckpt_dir"]) if job.get("ckpt_dir") else None,
                        resume=bool(job.get("resume")), replay=replay, replay_share=share)
        if not rt.is_main:
            return None
        summary["num_params"] = count_params(model)
        if hasattr(model, "base_params"):
            summary["base_params"] = model.base_params()
        if job.get("result"):
            write_atomic(Path(job["result"]), json.dumps(summary, indent=1, sort_keys=True))
        return summary
    finally:
        rt.close()


def _xla_worker(index: int, job: dict[str, Any]) -> None:
    run_job(job)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.train_cli", description=__doc__.splitlines()[0])
    parser.add_argument("job", help="the job file (JSON)")
    args = parser.parse_args(argv)
    try:
        job = json.loads(Path(args.job).read_text())
    except (OSError, ValueError) as exc:  # parser.error exits 2 with the usage line, no traceback
        parser.error(f"job file '{args.job}' cannot be read as JSON ({exc}); the train task writes it "
                     "(format: models/train_cli.py)")
    watch_launcher()
    if job["recipe"].get("device") == "xla" and int(job.get("nproc", 1)) > 1:
        import torch_xla

        torch_xla.launch(_xla_worker, args=(job,))  # one process per local XLA device
    else:
        run_job(job)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
