"""Tests for models/: exact channel ablation, causality, training, generation, data, checkpoints.

Everything runs on tiny configs so the file stays well under a minute on 2 CPU cores.
"""

from __future__ import annotations

import json
import math
import os
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from models.architectures import ARCHITECTURES, architecture, build, count_params
from models.checkpoint import load_model, save_model
from models.data import eval_batches, iterate_batches, load_split
from models.generate import generate
from models.gpt import ChannelDecoder
from models.trainer import heldout_loss, lr_at, train
from tinymars.profile import TrainRecipe

NAMES = ("memory", "affect", "time")
C, D, V, T = len(NAMES), 8, 32, 16
PAD, BOS, EOS, TGT = 0, 1, 2, 3
TINY = {"n_layer": 2, "n_head": 2, "d_model": 32, "channel_tokens": 2}
SCHEMA = pa.schema([("row_id", pa.string()), ("prompt_id", pa.string()), ("capability", pa.string()),
                    ("input_ids", pa.list_(pa.int32())), ("loss_mask", pa.list_(pa.int8())),
                    ("channels", pa.list_(pa.float32())), ("target_bytes", pa.int32())])


def tiny(arch: str, seed: int = 0, **kw) -> ChannelDecoder:
    spec = {"arch": arch, **TINY, **kw}
    return build(spec, vocab_size=V, seq_len=T, channel_names=NAMES, channel_dim=D, seed=seed)


def set_gates(model: ChannelDecoder, value: float) -> None:
    with torch.no_grad():
        for i, block in enumerate(model.blocks):
            if block.inject is not None:
                block.inject.gate.copy_(value * torch.linspace(1.0, -1.0, C) * (i + 1))


def livelier(model: ChannelDecoder, seed: int = 0) -> ChannelDecoder:
    """Random non-zero weights everywhere (the init zeroes residual outputs and shrinks the head),
    so outputs depend on every path and greedy argmaxes are far from ties."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            std = p.shape[1] ** -0.5 if p.dim() > 1 else 0.5  # 1-D params are the gates
            p.copy_(torch.randn(p.shape, generator=g) * std)
        model.lm_head.weight.mul_(8.0)
    return model.eval()


def write_shard(path, rows: list[dict]) -> None:
    cols = {k: [r[k] for r in rows] for k in SCHEMA.names}
    pq.write_table(pa.table(cols, schema=SCHEMA), path)


def sign_rows(n: int, seed: int, prompt_len: int = 3) -> list[dict]:
    """Register-like rows: the target token is 5 when the affect valence is > 0, else 6.

    The prompt is noise, so only the channel can tell the model which token comes next."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        ch = np.zeros((C, D), np.float32)
        ch[0] = rng.standard_normal(D) / math.sqrt(D)  # an unrelated "memory" embedding
        valence = rng.choice([-1.0, 1.0]) * rng.uniform(0.3, 1.0)
        ch[1, :2] = [valence, rng.uniform(0.0, 1.0)]
        ids = [BOS, *rng.integers(7, V, prompt_len).tolist(), TGT, 5 if valence > 0 else 6, EOS]
        mask = [0] * (prompt_len + 2) + [1, 1]
        rows.append({"row_id": f"r{i}", "prompt_id": f"p{i}", "capability": "affect", "input_ids": ids,
                     "loss_mask": mask, "channels": ch.reshape(-1).tolist(), "target_bytes": 3})
    return rows


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


# ---- exact ablation ---------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["native", "baseline"])
def test_zero_gates_make_channels_bit_exact_noops(arch: str) -> None:
    model = tiny(arch).eval()
    idx = torch.randint(0, V, (3, T))
    zeros, noise = torch.zeros(3, C, D), torch.randn(3, C, D) * 5
    with torch.no_grad():
        a, b, c = model(idx, zeros)[0], model(idx, noise)[0], model(idx, None)[0]
    assert torch.equal(a, b) and torch.equal(a, c)
    assert model.gate_values().shape == (TINY["n_layer"], C if arch == "native" else 0)
    assert model.alpha_l2() == 0.0


def test_nonzero_gates_make_channels_matter() -> None:
    model = tiny("native").eval()
    set_gates(model, 0.5)
    idx = torch.randint(0, V, (3, T))
    with torch.no_grad():
        a, b = model(idx, torch.zeros(3, C, D))[0], model(idx, torch.randn(3, C, D))[0]
    assert (a - b).abs().max() > 1e-3
    assert model.alpha_l2() == pytest.approx(float(model.gate_values().norm()))
    assert model.alpha_l2() > 0


# ---- causality ----------------------------------------------------------------------------------
def future_leak(model: ChannelDecoder) -> tuple[float, float]:
    """(max change at positions <= t, min change at t+1) when tokens after t are rewritten."""
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, V, (2, T), generator=g)
    channels = torch.randn(2, C, D, generator=g)
    past, future = 0.0, float("inf")
    with torch.no_grad():
        base = model(idx, channels)[0]
        for t in (0, 3, 7, T - 2):
            other = idx.clone()
            other[:, t + 1:] = (other[:, t + 1:] + 1 + torch.randint(0, V - 1, (1,), generator=g)) % V
            out = model(other, channels)[0]
            past = max(past, float((out[:, : t + 1] - base[:, : t + 1]).abs().max()))
            future = min(future, float((out[:, t + 1] - base[:, t + 1]).abs().max()))
    return past, future


@pytest.mark.parametrize("arch", ["native", "baseline"])
def test_no_future_leak(arch: str) -> None:
    model = livelier(tiny(arch))
    past, future = future_leak(model)
    assert past < 1e-5, f"logits at positions <= t changed by {past} when only later tokens changed"
    assert future > 1e-3  # the probe really perturbs something


def test_leak_probe_catches_a_non_causal_model(monkeypatch: pytest.MonkeyPatch) -> None:
    real = F.scaled_dot_product_attention

    def acausal(*args, **kw):
        kw["is_causal"] = False
        return real(*args, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", acausal)
    past, _ = future_leak(livelier(tiny("native")))
    assert past > 1e-3


# ---- gradients and learning -------------------------------------------------------------------
def test_gates_get_gradient_at_init_and_encoder_waits_for_them() -> None:
    model = tiny("native")
    idx = torch.randint(0, V, (4, T))
    _, loss = model(idx, torch.randn(4, C, D), idx, torch.ones(4, T))
    loss.backward()
    for block in model.blocks:
        assert block.inject.gate.grad.abs().min() > 0
    assert torch.count_nonzero(model.encoder.weight.grad) == 0  # ReZero: gated off until gates move


def test_gates_learn_a_channel_only_signal(tmp_path) -> None:
    write_shard(tmp_path / "train-00000.parquet", sign_rows(256, seed=0))
    write_shard(tmp_path / "heldout-00000.parquet", sign_rows(64, seed=1))
    train_rows = load_split([tmp_path / "train-00000.parquet"], channel_dim=D)
    held = load_split([tmp_path / "heldout-00000.parquet"], channel_dim=D)
    model = tiny("native", seed=1)
    cfg = TrainRecipe(steps=120, batch_size=16, lr=3e-3, warmup_steps=10, weight_decay=0.1, log_every=40,
                      eval_every=120, seed=0, gate_lr_mult=10.0)
    summary = train(model, train_rows, held, cfg, tmp_path / "out", pad_id=PAD, log=lambda s: None)
    assert summary["alpha_l2"] > 0.05
    batch = next(eval_batches(held, 64, T, PAD))
    pos = held.input_ids[0].tolist().index(TGT)  # every row has the same layout
    want = batch["targets"][:, pos]
    flipped = batch["channels"].clone()
    flipped[:, 1, 0] *= -1
    with torch.no_grad():
        real = model(batch["idx"], batch["channels"])[0][:, pos, 5:7].argmax(-1) + 5
        flip = model(batch["idx"], flipped)[0][:, pos, 5:7].argmax(-1) + 5
        ablated = model(batch["idx"], torch.zeros_like(flipped))[0][:, pos, 5:7].argmax(-1) + 5
    assert (real == want).float().mean() > 0.9
    assert (flip != want).float().mean() > 0.9  # the channel, not the prompt, decides
    assert (ablated == want).float().mean() < 0.75


def test_train_loss_decreases_and_writes_artifacts(tmp_path) -> None:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(48):  # learnable: the target repeats the prompt
        prompt = rng.integers(7, V, 5).tolist()
        ids = [BOS, *prompt, TGT, *prompt, EOS]
        rows.append({"row_id": f"r{i}", "prompt_id": f"p{i}", "capability": "memory", "input_ids": ids,
                     "loss_mask": [0] * 7 + [1] * 6, "target_bytes": 10,
                     "channels": rng.standard_normal(C * D).astype(np.float32).tolist()})
    write_shard(tmp_path / "train.parquet", rows)
    data = load_split([tmp_path / "train.parquet"], channel_dim=D)
    lines: list[str] = []
    cfg = TrainRecipe(steps=60, batch_size=8, lr=3e-3, warmup_steps=5, weight_decay=0.1, log_every=20,
                      eval_every=30, seed=0, channel_dropout=0.2, channel_dropout_warmup=10, gate_lr_mult=5.0)
    out = tmp_path / "run"
    summary = train(tiny("native"), data, data, cfg, out, pad_id=PAD, log=lines.append)
    records = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [20, 30, 40, 60]
    assert records[-1]["loss"] < records[0]["loss"] - 0.5
    assert "heldout_loss" in records[1] and "heldout_loss" not in records[0]
    assert np.array(records[-1]["gates"]).shape == (TINY["n_layer"], C)
    assert re.fullmatch(r"step 20/60 loss \d+\.\d{3} lr \d\.\de-\d\d tok/s [\d,]+ alpha_l2 \d+\.\d{4}", lines[0])
    meta = json.loads((out / "model.json").read_text())
    assert meta["arch"] == "native" and meta["num_params"] == summary["num_params"]
    assert meta["final_heldout_loss"] == pytest.approx(records[-1]["heldout_loss"])
    assert "tok_per_s" not in json.dumps(meta) and "timing" not in meta
    assert not list(out.glob(".*tmp"))


def test_training_is_deterministic(tmp_path) -> None:
    write_shard(tmp_path / "t.parquet", sign_rows(32, seed=0))
    data = load_split([tmp_path / "t.parquet"], channel_dim=D)
    cfg = TrainRecipe(steps=6, batch_size=4, lr=3e-3, warmup_steps=2, weight_decay=0.1, log_every=3,
                      eval_every=6, seed=3, channel_dropout=0.3)
    for name in ("a", "b"):
        train(tiny("native"), data, None, cfg, tmp_path / name, pad_id=PAD, log=lambda s: None)
    assert (tmp_path / "a/model.safetensors").read_bytes() == (tmp_path / "b/model.safetensors").read_bytes()
    assert (tmp_path / "a/model.json").read_text() == (tmp_path / "b/model.json").read_text()


def test_lr_schedule_warms_up_then_decays_to_floor() -> None:
    cfg = TrainRecipe(steps=100, batch_size=1, lr=1.0, warmup_steps=10, weight_decay=0.0, log_every=1,
                      eval_every=1, seed=0, min_lr_frac=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(55, cfg) == pytest.approx(0.55)
    assert lr_at(100, cfg) == pytest.approx(0.1)


# ---- generation -------------------------------------------------------------------------------
def naive_greedy(model, prompt: list[int], channels, max_new: int, eos_id: int) -> list[int]:
    seq, out = list(prompt), []
    with torch.no_grad():
        for _ in range(max_new):
            ch = None if channels is None else channels[None]
            nxt = int(model(torch.tensor([seq]), ch)[0][0, -1].argmax())
            if nxt == eos_id:
                break
            out.append(nxt)
            seq.append(nxt)
    return out


@pytest.mark.parametrize("arch", ["native", "baseline"])
def test_batched_kv_generation_equals_naive_recompute(arch: str) -> None:
    model = livelier(tiny(arch))
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, V, (n,), generator=g).tolist() for n in (1, 5, 2, 9, 4, 7)]
    channels = torch.randn(len(prompts), C, D, generator=g)
    free = [naive_greedy(model, p, c, 8, eos_id=-1) for p, c in zip(prompts, channels, strict=True)]
    for eos in (free[1][3], free[0][0]):  # tokens rows really emit: mid-sequence and first-token stops
        want = [naive_greedy(model, p, c, 8, eos) for p, c in zip(prompts, channels, strict=True)]
        assert any(len(w) < 8 for w in want) and any(len(w) == 8 for w in want)
        assert generate(model, prompts, channels, 8, eos_id=eos, pad_id=PAD, batch_size=4) == want
        assert generate(model, prompts, channels, 8, eos_id=eos, pad_id=PAD, batch_size=1) == want
    assert generate(model, prompts, None, 8, eos_id=eos, pad_id=PAD) == [
        naive_greedy(model, p, None, 8, eos) for p in prompts]


def test_left_padded_prefill_matches_full_forward() -> None:
    model = livelier(tiny("native"))
    a, b = torch.randint(3, V, (1, 4)), torch.randint(3, V, (1, 9))
    channels = torch.randn(2, C, D)
    idx = torch.cat([torch.cat([torch.full((1, 5), PAD), a], 1), b])
    valid = idx != PAD
    valid[1] = True
    with torch.no_grad():
        got = model.decode(idx, model.new_cache(2, 12), channels, valid)
        ref_a, ref_b = model(a, channels[:1])[0], model(b, channels[1:])[0]
    torch.testing.assert_close(got[0, 5:], ref_a[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got[1], ref_b[0], atol=1e-4, rtol=1e-4)


# ---- registry ---------------------------------------------------------------------------------
def test_registry_errors_name_the_bad_key() -> None:
    kw = {"vocab_size": V, "seq_len": T, "channel_names": NAMES, "channel_dim": D}
    with pytest.raises(ValueError, match=r"'n_layers'.*allowed.*n_layer"):
        build({"arch": "native", "n_layers": 2, "n_head": 2, "d_model": 32}, **kw)
    with pytest.raises(ValueError, match=r"'gpt5'.*baseline.*native"):
        build({"arch": "gpt5", **TINY}, **kw)
    with pytest.raises(ValueError, match="'d_model'"):
        build({"arch": "baseline", "n_layer": 2, "n_head": 2}, **kw)
    with pytest.raises(ValueError, match="channel"):
        build({"arch": "native", **TINY}, vocab_size=V, seq_len=T, channel_names=(), channel_dim=0)


def test_registry_builds_and_registers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("models.architectures.ARCHITECTURES", dict(ARCHITECTURES))
    native, base = tiny("native"), tiny("baseline")
    assert base.encoder is None and native.encoder is not None
    assert count_params(native) == native.num_params() > count_params(base)
    assert torch.equal(tiny("native", seed=4).wte.weight, tiny("native", seed=4).wte.weight)
    torch.manual_seed(5)
    state = torch.random.get_rng_state()
    a = tiny("native", seed=None)  # no seed: the caller's torch.manual_seed decides the init
    assert not torch.equal(torch.random.get_rng_state(), state)
    torch.manual_seed(5)
    assert torch.equal(a.wte.weight, tiny("native", seed=None).wte.weight)
    state = torch.random.get_rng_state()
    tiny("native", seed=9)  # a seed leaves the caller's RNG alone
    assert torch.equal(torch.random.get_rng_state(), state)

    @architecture("wide-baseline")
    def _wide(spec, **kw):
        return ARCHITECTURES["baseline"]({**spec, "d_model": 64}, **kw)

    from models import architectures
    assert architectures.ARCHITECTURES["wide-baseline"] is _wide
    wide = build({"arch": "wide-baseline", **TINY}, vocab_size=V, seq_len=T, channel_names=NAMES, channel_dim=D)
    assert wide.cfg.d_model == 64
    with pytest.raises(ValueError, match="already registered"):
        architecture("native")(_wide)


# ---- data -------------------------------------------------------------------------------------
def test_batches_shift_targets_and_mask_and_resume(tmp_path) -> None:
    rows = sign_rows(10, seed=0)
    rows[0]["input_ids"] = list(range(1, 2 * T + 1))  # longer than T + 1: truncated
    rows[0]["loss_mask"] = [0] * T + [1] * T
    write_shard(tmp_path / "a.parquet", rows[:6])
    write_shard(tmp_path / "b.parquet", rows[6:])
    data = load_split([tmp_path / "a.parquet", tmp_path / "b.parquet"], channel_dim=D)
    assert len(data) == 10 and data.channels.shape == (10, C, D) and data.row_id[6] == "r6"
    first = next(eval_batches(data, 4, T, PAD))
    ids, mask = data.input_ids[1], data.loss_mask[1]
    n = len(ids) - 1
    assert first["idx"][1, :n].tolist() == ids[:-1].tolist()
    assert first["targets"][1, :n].tolist() == ids[1:].tolist()
    assert first["loss_mask"][1, :n].tolist() == mask[1:].tolist() and first["loss_mask"][1, n:].sum() == 0
    assert (first["idx"][1, n:] == PAD).all()
    assert first["targets"][0].tolist() == list(range(2, T + 2)) and first["loss_mask"][0, T - 1] == 1
    assert [b["idx"].shape[0] for b in eval_batches(data, 4, T, PAD)] == [4, 4, 2]

    stream = iterate_batches(data, 4, T, PAD, seed=7)
    batches = [next(stream) for _ in range(8)]  # 32 samples: crosses three epochs
    assert all(b["idx"].shape == (4, T) and b["channels"].shape == (4, C, D) for b in batches)
    resumed = next(iterate_batches(data, 4, T, PAD, seed=7, start_step=5))
    assert all(torch.equal(resumed[k], batches[5][k]) for k in resumed)
    other = next(iterate_batches(data, 4, T, PAD, seed=8))
    assert not torch.equal(other["idx"], batches[0]["idx"])
    samples = torch.cat([b["idx"] for b in batches])
    assert sorted(map(tuple, samples[:10].tolist())) == sorted(map(tuple, first_epoch_rows(data)))
    assert not torch.equal(samples[:10], samples[10:20])  # each epoch is reshuffled


def test_load_split_reads_channel_dim_from_pack_json(tmp_path) -> None:
    write_shard(tmp_path / "train-00000.parquet", sign_rows(3, seed=0))
    with pytest.raises(ValueError, match="channel_dim"):
        load_split([tmp_path / "train-00000.parquet"])
    (tmp_path / "pack.json").write_text(json.dumps({"channel_dim": D, "channel_names": list(NAMES)}))
    data = load_split([tmp_path / "train-00000.parquet"])
    assert data.channels.shape == (3, C, D) and data.channels[0, 1, 0] != 0
    assert data.target_bytes.tolist() == [3, 3, 3]


def first_epoch_rows(data) -> list[list[int]]:
    return [b.tolist() for batch in eval_batches(data, 10, T, PAD) for b in batch["idx"]]


# ---- heldout loss and checkpoints -------------------------------------------------------------
def test_heldout_bits_per_byte_matches_hand_computation(tmp_path) -> None:
    rows = sign_rows(3, seed=2, prompt_len=2)
    rows[1]["input_ids"] = rows[1]["input_ids"][:-1] + [9, 10, EOS]  # rows of different lengths
    rows[1]["loss_mask"] = rows[1]["loss_mask"] + [1, 1]
    for r, nbytes in zip(rows, (3, 11, 5), strict=True):
        r["target_bytes"] = nbytes
    write_shard(tmp_path / "h.parquet", rows)
    data = load_split([tmp_path / "h.parquet"], channel_dim=D)
    model = livelier(tiny("native"))
    total = 0.0
    with torch.no_grad():
        for r in rows:
            ids = torch.tensor(r["input_ids"])
            ch = torch.tensor(r["channels"]).view(1, C, D)
            logp = model(ids[None, :-1], ch)[0][0].log_softmax(-1)
            for t, m in enumerate(r["loss_mask"][1:]):
                if m:
                    total -= float(logp[t, ids[t + 1]])
    got = heldout_loss(model, data, batch_size=2, seq_len=T, pad_id=PAD, zero_channels=False)
    assert got["tokens"] == 2 + 4 + 2
    assert got["total_nats"] == pytest.approx(total, rel=1e-5)
    assert got["nats_per_token"] == pytest.approx(total / 8, rel=1e-5)
    assert got["bits_per_byte"] == pytest.approx(total / math.log(2) / 19, rel=1e-5)
    zeroed = heldout_loss(model, data, batch_size=2, seq_len=T, pad_id=PAD, zero_channels=True)
    assert zeroed["total_nats"] != pytest.approx(total, rel=1e-3)


@pytest.mark.parametrize("arch", ["native", "baseline"])
def test_save_load_round_trip_gives_identical_logits(arch: str, tmp_path) -> None:
    model = livelier(tiny(arch))
    save_model(model, tmp_path, {"final_loss": 1.0})
    loaded = load_model(tmp_path)
    idx, channels = torch.randint(0, V, (2, T)), torch.randn(2, C, D)
    with torch.no_grad():
        assert torch.equal(model(idx, channels)[0], loaded(idx, channels)[0])
    meta = json.loads((tmp_path / "model.json").read_text())
    assert meta["config"]["n_layer"] == 2 and meta["arch"] == arch and meta["final_loss"] == 1.0


# ---- static graphs ----------------------------------------------------------------------------
def compiled_steps(backend: str) -> None:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = tiny("native")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    step = torch.compile(model, fullgraph=True, dynamic=False, backend=backend)
    g = torch.Generator().manual_seed(0)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(3):
            idx = torch.randint(0, V, (4, T), generator=g)
            channels = torch.randn(4, C, D, generator=g) * (torch.rand(4, C, 1, generator=g) > 0.3)
            _, loss = step(idx, channels, idx.roll(-1, 1), (torch.rand(4, T, generator=g) > 0.5).float())
            loss.backward()
            opt.step()
            opt.zero_grad()
    assert counters["stats"]["unique_graphs"] == 1
    assert model.alpha_l2() > 0  # the gates trained through the compiled graph


def test_compiled_train_step_has_one_static_graph() -> None:
    """Dynamo capture (what XLA also needs) with a cheap backend; inductor codegen is the slow test."""
    compiled_steps("aot_eager")


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("TINYMARS_TEST_INDUCTOR"),
                    reason="inductor C++ codegen takes ~40 s cold on 2 cores (the aot_eager test above checks "
                           "capture and recompiles); set TINYMARS_TEST_INDUCTOR=1 to run it")
def test_compiled_train_step_inductor() -> None:
    compiled_steps("inductor")


# ---- profile model specs and `tinymars models` ---------------------------------------------------
def test_model_specs_validate_per_arch() -> None:
    from tinymars.profile import ModelSpec

    assert ModelSpec(name="b", arch="baseline", bracket="above").n_layer is None
    assert ModelSpec(name="b", arch="baseline", bracket="above", n_layer=3).d_model is None  # width sized
    for bad, msg in [({"arch": "baseline", "bracket": "below", "n_layer": 3, "d_model": 32},
                      "bracket sizes n_layer or d_model; give at most one of them"),
                     ({"arch": "native", "bracket": "below"}, "bracket is for arch 'baseline'"),
                     ({"arch": "baseline", "n_head": 2}, "needs n_layer, d_model"),
                     ({"arch": "adapter"}, "needs base"),
                     ({"arch": "adapter", "base": "/m", "n_layer": 2}, "takes its shape from the base; remove n_layer"),
                     ({"arch": "native", "n_layer": 2, "n_head": 2, "d_model": 32, "base": "/m"}, "'adapter'")]:
        with pytest.raises(ValueError, match=re.escape(msg)):
            ModelSpec(name="m", **bad)


def test_tinymars_models_prints_the_bracketing_counts(capsys: pytest.CaptureFixture[str]) -> None:
    from app.cli import main
    from models.sizing import count_spec_params

    models = ("[{name: native, arch: native, n_layer: 3, n_head: 2, d_model: 32}, "
              "{name: lo, arch: baseline, bracket: below}, {name: hi, arch: baseline, bracket: above}]")
    assert main(["models", "--profile", "tiny", "--set", f"train.models={models}", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)["models"]}
    assert rows["lo"]["params"] < rows["native"]["params"] < rows["hi"]["params"]
    assert rows["lo"]["n_layer"] == rows["hi"]["n_layer"] == 3 and rows["lo"]["d_model"] < rows["hi"]["d_model"]
    assert all(r["trainable"] == r["params"] for r in rows.values())
    kw = {"vocab_size": 1000, "seq_len": 192, "channel_names": ["memory", "identity", "continuity", "affect",
                                                                "time", "ethics"], "channel_dim": 384}
    built = build({"arch": "native", "n_layer": 3, "n_head": 2, "d_model": 32, "channel_tokens": 2,
                   "channel_dims": [384, 384, 384, 2, 16, 24]}, **kw)
    assert rows["native"]["params"] == count_params(built) == count_spec_params(built.build_info["spec"], **kw)
    assert main(["models", "--profile", "tiny"]) == 0
    text = capsys.readouterr().out
    assert re.search(r"native\s+native\s+2\s+2\s+32\s+0\.\d+M \([\d,]+\)\s+all\s+\+0\.0%", text)
    assert "affect 2, time 16, ethics 24" in text
    assert ("reference (tinyMARS iteration 7): baseline-6L 100.8M (-8.5%) / native 110.2M (+0.0%) / "
            "baseline-7L 120.3M (+9.2%)") in text


@pytest.mark.parametrize("arch", ["native", "baseline"])
def test_bf16_autocast_trains(arch: str) -> None:
    """What CUDA/XLA run: rope and rms_norm in fp32, matmuls in bf16, one dtype into SDPA."""
    model = livelier(tiny(arch)).train()
    idx, channels = torch.randint(0, V, (2, T)), torch.randn(2, C, D)
    want = model(idx, channels, idx, None)[1].detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss = model(idx, channels, idx, None)
    loss.backward()
    assert loss.dtype == torch.float32 and loss.detach().item() == pytest.approx(want.item(), rel=0.05)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
