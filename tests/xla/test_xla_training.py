"""The torch_xla path for real (PJRT on the CPU): `make test-xla` runs this in its own torch 2.9 + torch_xla
environment; the main suite skips it. It trains the native model and a baseline a few steps on the XLA
device and checks that (1) the compile count stops growing after the first steps, in training, held-out
evaluation and fixed-shape generation, and (2) the losses match the same run on eager CPU."""

from __future__ import annotations

import importlib.util
import os

import pytest

if importlib.util.find_spec("torch_xla") is None:
    pytest.skip("needs torch_xla (its own environment: make test-xla)", allow_module_level=True)
os.environ.setdefault("PJRT_DEVICE", "CPU")

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch_xla  # noqa: E402
import torch_xla.debug.metrics as met  # noqa: E402
from test_models import PAD, C, D, V, livelier, sign_rows, tiny, write_shard  # noqa: E402

from models.data import load_split  # noqa: E402
from models.generate import generate  # noqa: E402
from models.trainer import train  # noqa: E402
from tinymars.profile import TrainRecipe

# Register the XLA device before this process runs any backward on the CPU: autograd sizes its
# per-device queues at its first backward, and an XLA device that appears later trips an assert.
torch_xla.device()

STEPS = 10
RECIPE = {"steps": STEPS, "batch_size": 8, "lr": 3e-3, "warmup_steps": 3, "weight_decay": 0.1, "log_every": 1,
          "eval_every": 4, "seed": 0, "channel_dropout": 0.3, "channel_dropout_warmup": 3, "gate_lr_mult": 10.0,
          "precision": "fp32"}


def compiles() -> int:
    data = met.metric_data("CompileTime")
    return int(data[0]) if data else 0


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    folder = tmp_path_factory.mktemp("xla-data")
    write_shard(folder / "train.parquet", sign_rows(48, seed=0))
    write_shard(folder / "heldout.parquet", sign_rows(20, seed=1))  # 20 rows: the last eval batch is short
    return tuple(load_split([folder / f"{split}.parquet"], channel_dim=D) for split in ("train", "heldout"))


def run(arch: str, device: str, rows, out: Path, **kw) -> tuple[list[dict], list[int], dict]:
    """Train; return metrics records (no wall clock), the compile count after each step, the state dict."""
    counts: list[int] = []
    model = tiny(arch, seed=1)
    cfg = TrainRecipe(**{**RECIPE, **kw}, device=device)
    train(model, rows[0], rows[1], cfg, out, pad_id=PAD, log=lambda line: counts.append(compiles()))
    records = [{k: v for k, v in json.loads(s).items() if k != "tok_per_s"}
               for s in (out / "metrics.jsonl").read_text().splitlines()]
    return records, counts, {k: v.cpu() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("arch", ["native", "baseline"])
def test_xla_training_compiles_once_and_matches_eager_cpu(arch: str, rows, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    want, _, w_cpu = run(arch, "cpu", rows, tmp_path / "cpu")
    got, counts, w_xla = run(arch, "xla", rows, tmp_path / "xla")
    print(f"\n[{arch}] compile count after each step on XLA: {counts}")
    assert len(counts) == STEPS
    # held-out evaluation first runs at step 4: from step 5 on, nothing is ever compiled again
    assert counts[4:] == [counts[4]] * (STEPS - 4), f"recompiles after warm-up: {counts}"
    assert counts[-1] <= 20, f"too many distinct graphs: {counts}"
    for a, b in zip(want, got, strict=True):
        assert b["step"] == a["step"]
        assert b["loss"] == pytest.approx(a["loss"], rel=2e-4, abs=2e-4)
        if "heldout_loss" in a:
            assert b["heldout_loss"] == pytest.approx(a["heldout_loss"], rel=2e-4, abs=2e-4)
        assert np.allclose(b["gates"], a["gates"], atol=2e-4)
    for k in w_cpu:
        torch.testing.assert_close(w_xla[k], w_cpu[k], atol=5e-4, rtol=5e-3)
    assert want[-1]["loss"] < want[0]["loss"]


def test_xla_bf16_autocast_trains_without_recompiles(rows, tmp_path: Path) -> None:
    got, counts, _ = run("native", "xla", rows, tmp_path / "bf16", precision="bf16")
    print(f"\n[native bf16] compile count after each step on XLA: {counts}")
    assert counts[4:] == [counts[4]] * (STEPS - 4), f"recompiles after warm-up: {counts}"
    assert all(np.isfinite(r["loss"]) for r in got) and got[-1]["loss"] < got[0]["loss"]


def test_fixed_shape_generation_compiles_once(rows) -> None:
    device = torch_xla.device()
    model = livelier(tiny("native")).to(device)
    g = torch.Generator().manual_seed(0)
    batches = [[torch.randint(3, V, (n,), generator=g).tolist() for n in lengths] for lengths in ((2, 5, 3), (4, 1, 6))]
    channels = torch.randn(3, C, D, generator=g)
    counts, outs = [], []
    for prompts in batches * 2:
        outs.append(generate(model, prompts, channels, 8, eos_id=-1, pad_id=PAD, batch_size=4, fixed_shape=True,
                             prompt_len=8))
        counts.append(compiles())
    print(f"\n[generate] compile count after each call: {counts}")
    assert counts[1:] == [counts[1]] * 3, f"generation recompiled: {counts}"
    cpu = model.cpu()
    assert outs[0] == generate(cpu, batches[0], channels, 8, eos_id=-1, pad_id=PAD, batch_size=4)
    assert outs[1] == generate(cpu, batches[1], channels, 8, eos_id=-1, pad_id=PAD, batch_size=4)
