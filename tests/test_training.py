"""Training at scale, proved on CPU: exact resume after SIGKILL, DDP (2 gloo ranks) == 1 process,
gradient accumulation, checkpoint verification, bracketing baselines, the subprocess launcher."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_models import BOS, NAMES, PAD, TINY, D, T, V, sign_rows, tiny, write_shard

from models.checkpoint import checkpoint_files, latest_checkpoint, load_model, verify_checkpoint, write_checkpoint
from models.data import batch_rows, load_split, shard_rows
from models.launch import launch_command, run_streaming
from models.sizing import bracket_depth, count_spec_params, registry_specs
from models.trainer import channel_keep, lr_at, train
from models.weights import CheckpointError
from tinymars.profile import TrainRecipe

ROOT = Path(__file__).resolve().parents[1]
# One thread per process: the same float reductions in every process, whatever the machine.
CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
BUILD = {"vocab_size": V, "seq_len": T, "channel_names": list(NAMES), "channel_dim": D, "seed": 0}
RECIPE = {"steps": 8, "batch_size": 8, "lr": 3e-3, "warmup_steps": 2, "weight_decay": 0.1, "log_every": 1,
          "eval_every": 4, "seed": 5, "channel_dropout": 0.3, "channel_dropout_warmup": 2, "gate_lr_mult": 10.0,
          "device": "cpu"}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[str, list[str]]:
    folder = tmp_path_factory.mktemp("shards")
    write_shard(folder / "train-00000.parquet", sign_rows(40, seed=0))
    write_shard(folder / "heldout-00000.parquet", sign_rows(12, seed=1))
    return {"train": [str(folder / "train-00000.parquet")], "heldout": [str(folder / "heldout-00000.parquet")]}


def job(tmp: Path, shards: dict[str, list[str]], name: str, spec: dict | None = None, **train_kw) -> Path:
    """A train_cli job file; a dropout model so the per-step RNG is exercised too."""
    body = {"spec": spec or {"arch": "native", **TINY, "dropout": 0.1}, "build": BUILD,
            "data": {**shards, "channel_dim": D, "pad_id": PAD}, "recipe": {**RECIPE, **train_kw},
            "out_dir": str(tmp / name / "out"), "ckpt_dir": str(tmp / name / "ckpt"), "resume": True,
            "result": str(tmp / name / "result.json")}
    path = tmp / f"{name}.json"
    path.write_text(json.dumps(body))
    return path


def run_cli(cmd: list[str]) -> str:
    done = subprocess.run(cmd, cwd=ROOT, env=CHILD_ENV, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def records(out: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock field."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "tok_per_s"} for r in rows]


# ---- exact resume -------------------------------------------------------------------------------
KILLER = textwrap.dedent("""
    import json, os, signal, sys
    from pathlib import Path
    from models.data import load_split
    from models.architectures import build
    from models.trainer import TrainRecipe, train

    job = json.loads(Path(sys.argv[1]).read_text())
    b, d = job["build"], job["data"]
    model = build(job["spec"], vocab_size=b["vocab_size"], seq_len=b["seq_len"], channel_names=b["channel_names"],
                  channel_dim=b["channel_dim"], seed=b["seed"])

    def log(line):
        print(line, flush=True)
        if line.startswith(sys.argv[2]):
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no finally: a real kill

    rows, held = (load_split(d[split], channel_dim=d["channel_dim"]) for split in ("train", "heldout"))
    train(model, rows, held, TrainRecipe.model_validate(job["recipe"]), Path(job["out_dir"]), d["pad_id"], log,
          ckpt_dir=Path(job["ckpt_dir"]))
""")


def test_resume_after_sigkill_is_exact(tmp_path: Path, shards) -> None:
    straight = job(tmp_path, shards, "straight", checkpoint_every=2)
    run_cli([sys.executable, "-m", "models.train_cli", str(straight)])

    killed = job(tmp_path, shards, "killed", checkpoint_every=4)
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    done = subprocess.run([sys.executable, str(script), str(killed), "step 6/8"], cwd=ROOT, env=CHILD_ENV,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == -9, done.stdout + done.stderr  # SIGKILLed after step 6, checkpoint at 4
    assert "checkpoint step 4" in done.stdout and not (tmp_path / "killed/out/model.safetensors").exists()
    assert len(records(tmp_path / "killed/out")) == 6

    # the retry builds into a fresh folder (as the artifact store does) and resumes from step 4
    body = json.loads(killed.read_text())
    body["out_dir"] = str(tmp_path / "killed/retry")
    killed.write_text(json.dumps(body))
    out = run_cli([sys.executable, "-m", "models.train_cli", str(killed)])
    assert "resumed from" in out and "at step 4" in out and "step 5/8" in out and "step 4/8" not in out

    want, got = records(tmp_path / "straight/out"), records(tmp_path / "killed/retry")
    assert [r["step"] for r in got] == list(range(1, 9))
    assert got == want  # losses, lr, held-out loss, gates: equal at every step
    a = (tmp_path / "straight/out/model.safetensors").read_bytes()
    assert a == (tmp_path / "killed/retry/model.safetensors").read_bytes()
    assert json.loads((tmp_path / "killed/result.json").read_text())["timing"]["resumed_at"] == 4


# ---- DDP ----------------------------------------------------------------------------------------
def test_ddp_two_gloo_ranks_match_one_process(tmp_path: Path, shards) -> None:
    one = job(tmp_path, shards, "one", spec={"arch": "native", **TINY}, steps=4)
    two = job(tmp_path, shards, "two", spec={"arch": "native", **TINY}, steps=4)
    run_cli(launch_command(one, 1, "cpu"))
    cmd = launch_command(two, 2, "cpu")
    assert "--nproc_per_node=2" in cmd
    out = run_cli(cmd)
    assert "on 2 x cpu" in out
    a, b = records(tmp_path / "one/out"), records(tmp_path / "two/out")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for x, y in zip(a, b, strict=True):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5)
        assert np.allclose(y["gates"], x["gates"], atol=1e-6)
    assert b[-1]["heldout_loss"] == pytest.approx(a[-1]["heldout_loss"], rel=1e-5)
    wa, wb = load_file(tmp_path / "one/out/model.safetensors"), load_file(tmp_path / "two/out/model.safetensors")
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=2e-5, rtol=1e-4)
    assert a[-1]["loss"] < a[0]["loss"]  # it trained at all
    assert json.loads((tmp_path / "two/result.json").read_text())["timing"]["devices"] == 2


def test_grad_accumulation_matches_one_big_batch(tmp_path: Path, shards) -> None:
    rows = load_split(shards["train"], channel_dim=D)
    outs = []
    for accum in (1, 4):
        cfg = TrainRecipe(**{**RECIPE, "steps": 3, "log_every": 1, "eval_every": 3}, grad_accum=accum)
        model = tiny("native")
        train(model, rows, None, cfg, tmp_path / f"a{accum}", pad_id=PAD, log=lambda s: None)
        outs.append((records(tmp_path / f"a{accum}"), model.state_dict()))
    (r1, w1), (r4, w4) = outs
    assert [r["loss"] for r in r4] == pytest.approx([r["loss"] for r in r1], rel=1e-5)
    for k in w1:
        torch.testing.assert_close(w4[k], w1[k], atol=2e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="divisible by grad_accum"):
        train(tiny("native"), rows, None, TrainRecipe(**RECIPE, grad_accum=3), tmp_path / "bad", pad_id=PAD)


def test_ranks_split_each_global_batch_without_overlap() -> None:
    picks = batch_rows(10, 8, seed=3, step=7)
    parts = [shard_rows(picks, 2, 2, r, a) for a in range(2) for r in range(2)]
    assert sorted(np.concatenate(parts).tolist()) == sorted(picks.tolist())
    assert all(len(p) == 2 for p in parts)
    # a row's channel-dropout mask is the same whatever the number of ranks (drawn for the global batch)
    keep = channel_keep(8, 3, 0.5, seed=1, step=4)
    assert torch.equal(keep, channel_keep(8, 3, 0.5, seed=1, step=4)) and 0 < keep.mean() < 1
    assert channel_keep(8, 3, 0.0, seed=1, step=4) is None


def test_linear_schedule_and_warmup() -> None:
    cfg = TrainRecipe(**{**RECIPE, "steps": 110, "warmup_steps": 10}, schedule="linear", min_lr_frac=0.0)
    assert lr_at(0, cfg) == pytest.approx(RECIPE["lr"] / 10)
    assert lr_at(60, cfg) == pytest.approx(RECIPE["lr"] / 2)
    assert lr_at(110, cfg) == pytest.approx(0.0)


# ---- checkpoints ----------------------------------------------------------------------------------
def saved_checkpoint(tmp: Path, step: int = 3, fp: dict | None = None) -> Path:
    model = tiny("native")
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randint(0, V, (2, T)), None, torch.randint(0, V, (2, T)))[1].backward()
    opt.step()
    files = checkpoint_files(model, opt, {"step": step, "loss_acc": torch.tensor(1.5), "n_acc": 1}, "{}\n")
    return write_checkpoint(tmp, step, files, fp or {"model": "tiny"}, keep=2)


def test_corrupt_checkpoint_is_refused_naming_the_file(tmp_path: Path) -> None:
    old = saved_checkpoint(tmp_path, step=2)
    new = saved_checkpoint(tmp_path, step=4)
    ckpt = verify_checkpoint(new)
    assert ckpt.step == 4 and ckpt.trainer_state()["n_acc"] == 1 and "state" in ckpt.optimizer_state()
    data = bytearray((new / "optimizer.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (new / "optimizer.pt").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"step-00000004/optimizer\.pt: sha256 does not match"):
        verify_checkpoint(new)
    warnings: list[str] = []
    assert latest_checkpoint(tmp_path, {"model": "tiny"}, warn=warnings.append).path == old  # falls back
    assert "optimizer.pt" in warnings[0]
    (tmp_path / ".tmp-step-00000006-abcdef12").mkdir()  # a kill mid-write leaves only a temporary folder
    (new / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model\.safetensors: missing"):
        verify_checkpoint(new)
    assert latest_checkpoint(tmp_path, {"model": "tiny"}, warn=warnings.append).path == old
    for s in (6, 8, 10):
        saved_checkpoint(tmp_path, step=s)
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-00000008", "step-00000010"]  # keep=2


def test_checkpoint_of_another_run_is_refused(tmp_path: Path) -> None:
    saved_checkpoint(tmp_path, fp={"model": {"spec": {"n_layer": 2}}, "train": {"lr": 0.1}})
    with pytest.raises(CheckpointError, match=r"another model or training recipe \(model\.spec\.n_layer: "
                                              r"checkpoint 2 vs now 3"):
        latest_checkpoint(tmp_path, {"model": {"spec": {"n_layer": 3}}, "train": {"lr": 0.1}})


def test_model_file_from_another_shape_or_corrupt_gives_clear_errors(tmp_path: Path) -> None:
    from models.checkpoint import save_model

    save_model(tiny("native"), tmp_path / "m")
    meta = json.loads((tmp_path / "m/model.json").read_text())
    meta["build"]["spec"]["d_model"] = 64  # model.json now describes another shape than the weights
    meta["weights_sha256"] = None
    (tmp_path / "m/model.json").write_text(json.dumps(meta))
    shape_error = (r"model\.safetensors: was written by a model of another shape: shapes differ "
                   r"\(blocks\.0\.attn\.proj\.weight: file \[32, 32\] vs model \[64, 64\]")
    with pytest.raises(CheckpointError, match=shape_error):
        load_model(tmp_path / "m")
    save_model(tiny("native"), tmp_path / "n")
    with open(tmp_path / "n/model.safetensors", "r+b") as f:
        f.seek(200)
        f.write(b"\x00\x01\x02")
    with pytest.raises(CheckpointError, match=r"n/model\.safetensors: sha256 does not match"):
        load_model(tmp_path / "n")


# ---- sizing and launching -------------------------------------------------------------------------
def test_bracketing_baselines_straddle_the_native() -> None:
    kw = {"vocab_size": 1000, "seq_len": 64, "channel_names": NAMES, "channel_dim": 48}
    native = {"arch": "native", "n_layer": 3, "n_head": 4, "d_model": 64, "channel_tokens": 2}
    n = count_spec_params(native, **kw)
    assert n == sum(p.numel() for p in tiny_like(native, kw).parameters())  # meta count == real count
    specs = registry_specs([{"name": "native", **native, "channel_tokens": None},
                            {"name": "lo", "arch": "baseline", "bracket": "below"},
                            {"name": "hi", "arch": "baseline", "bracket": "above", "mlp_ratio": None},
                            {"name": "fixed", "arch": "baseline", "n_layer": 2, "n_head": 4, "d_model": 64}],
                           **kw, channel_tokens=2)
    lo, hi = specs["lo"], specs["hi"]
    assert lo["n_layer"] == hi["n_layer"] == 3 and "bracket" not in lo and specs["fixed"]["n_layer"] == 2
    assert lo["d_model"] < hi["d_model"]  # the native's depth, the width sized (models.sizing)
    assert count_spec_params(lo, **kw) < n < count_spec_params(hi, **kw)
    depth = bracket_depth(native, {"arch": "baseline", "n_head": 4, "d_model": 64}, "below", **kw)
    assert count_spec_params({"arch": "baseline", "n_head": 4, "d_model": 64, "n_layer": depth}, **kw) < n <= \
        count_spec_params({"arch": "baseline", "n_head": 4, "d_model": 64, "n_layer": depth + 1}, **kw)
    with pytest.raises(ValueError, match="no baseline is smaller"):
        bracket_depth(native, {"arch": "baseline", "n_head": 4, "d_model": 512}, "below", **kw)


def tiny_like(spec: dict, kw: dict) -> torch.nn.Module:
    from models.architectures import build

    return build(spec, **kw)


def test_launcher_streams_lines_and_reports_failure(tmp_path: Path) -> None:
    lines: list[str] = []
    script = "import os; print('a'); print(os.environ['TINYMARS_LAUNCHER_PID']); raise SystemExit(3)"
    code, tail = run_streaming([sys.executable, "-c", script], lines.append)
    assert code == 3 and lines == ["a", str(os.getpid())] and tail == lines
    assert launch_command("j.json", 1, "cpu")[1:] == ["-m", "models.train_cli", "j.json"]
    assert launch_command("j.json", 4, "xla")[1:] == ["-m", "models.train_cli", "j.json"]  # XLA spawns itself


# ---- the train task: subprocess, streaming, resume across attempts --------------------------------
class Cancelled(Exception):
    pass


def fake_pack(home: Path, shards: dict[str, list[str]]) -> dict:
    """A verified pack artifact holding the test shards (what the pack stage hands the train task)."""
    import shutil

    from tinymars.artifacts import ArtifactStore

    def builder(out: Path) -> dict:
        names = {}
        for split, paths in shards.items():
            names[split] = [f"{split}-00000.parquet"]
            shutil.copy(paths[0], out / names[split][0])
        (out / "pack.json").write_text(json.dumps({"vocab_size": V, "seq_len": T, "channel_names": list(NAMES),
                                                   "channel_dim": D, "pad_id": PAD, "bos_id": BOS, "shards": names}))
        return {"rows": 52}

    return {"artifact": ArtifactStore(home / "artifacts").build("pack", "k" * 32, builder).to_dict()}


class Lines(list):
    """A stand-in for the task's logger that keeps what it is told."""

    def info(self, msg: str) -> None:
        self.append(msg)

    warning = info


def test_train_task_resumes_a_cancelled_attempt(tmp_path: Path, shards, monkeypatch) -> None:
    import models.launch
    from tasks.train import train_task
    from tinymars.profile import load_profile

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    log = Lines()
    monkeypatch.setattr("tasks.train.logger", lambda: log)
    prof = load_profile("tiny", ["train.steps=8", "train.checkpoint_every=2", "train.log_every=1",
                                 "train.batch_size=8", "train.warmup_steps=2"])
    spec = prof.train.models[0]
    straight = train_task.fn(prof, str(tmp_path / "a"), fake_pack(tmp_path / "a", shards), spec)

    home = tmp_path / "b"
    pack = fake_pack(home, shards)
    real = models.launch.run_streaming

    def cancel_after_checkpoint(cmd, on_line, **kw):
        def on(line: str) -> None:
            on_line(line)
            if line.startswith("checkpoint step 4"):
                raise Cancelled  # what a Prefect cancellation does mid-stream
        return real(cmd, on, **kw)

    monkeypatch.setattr(models.launch, "run_streaming", cancel_after_checkpoint)
    with pytest.raises(Cancelled):
        train_task.fn(prof, str(home), pack, spec)
    work = next((home / "checkpoints").iterdir())
    assert list((work / "ckpt").glob("step-*")) and not list((home / "artifacts/train").glob("*/manifest.json"))
    monkeypatch.setattr(models.launch, "run_streaming", real)
    log.clear()
    resumed = train_task.fn(prof, str(home), pack, spec)
    text = "\n".join(log)
    # SIGTERM lands after checkpoint 4, or (a fast child) after checkpoint 6: either way no step is redone twice
    assert re.search(r"resumed from .*step-0000000[46] at step [46]", text), text
    assert "step 8/8" in text and "step 1/8" not in text
    a, b = (Path(r["artifact"]["path"]) / "model.safetensors" for r in (straight, resumed))
    assert a.read_bytes() == b.read_bytes()
    assert straight["artifact"]["content_hash"] != "" and not (work / "ckpt").exists()  # cleaned once built
    metrics = {m["key"]: m["value"] for m in resumed["metrics"]}
    assert metrics["num_params"] > 0 and metrics["sec_per_step"] > 0 and "final_heldout_loss" in metrics
