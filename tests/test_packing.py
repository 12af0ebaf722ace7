"""Packed training data (issue 14): whole rows fill seq_len windows, nothing crosses a row, the loss head
runs only at target positions, and packing changes no held-out number and no learning outcome."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_models import BOS, EOS, NAMES, PAD, TGT, C, D, V, write_shard

from models import gpt
from models.adapter import AdapterLM
from models.architectures import ARCHITECTURES, build
from models.data import (
    PAD_ROW,
    PackedRows,
    TrainBatches,
    WindowStream,
    load_split,
    make_batch,
    make_window_batch,
    pack_windows,
    packing_efficiency,
    row_positions,
    tile_slots,
    tiling,
    window_slots,
)
from models.gpt import Window
from models.trainer import heldout_loss, train
from tinymars.profile import TrainRecipe

T = 150  # three tiles of 50 positions: rows straddle tile boundaries
PACKED_ARCHS = {
    "native": {"arch": "native", "n_layer": 2, "n_head": 2, "d_model": 32, "channel_tokens": 2},
    "baseline": {"arch": "baseline", "n_layer": 2, "n_head": 2, "d_model": 32},
    "vocab_graph": {"arch": "vocab_graph", "rank": 4, "hops": 2},
    "vocab_conv": {"arch": "vocab_conv", "hops": 2, "kernel": 4, "fourier_basis": 4, "op_width": 8},
}


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)  # shapes this small gain nothing from a second thread and lose a lot on a busy box


def random_rows(n: int, seed: int, longest: int = 40, vocab: int = V) -> PackedRows:
    """Rows of 3..longest tokens, random masks (targets at the end), random channels and byte counts."""
    rng = np.random.default_rng(seed)
    ids = [rng.integers(4, vocab, rng.integers(3, longest + 1)).astype(np.int32) for _ in range(n)]
    masks = [(np.arange(len(a)) >= rng.integers(1, len(a))).astype(np.int8) for a in ids]
    return PackedRows([f"r{i}" for i in range(n)], [f"p{i}" for i in range(n)], ["memory"] * n, ids, masks,
                      rng.standard_normal((n, C, D)).astype(np.float32), rng.integers(1, 50, n).astype(np.int64))


def scrambled(arch: str, seed: int = 0) -> torch.nn.Module:
    """A model with random non-zero weights everywhere (gates open), so every path shows in the logits."""
    model = build(PACKED_ARCHS[arch], vocab_size=V, seq_len=T, channel_names=NAMES, channel_dim=D, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * (0.5 if p.dim() < 2 else p.shape[-1] ** -0.5))
    return model.eval()


def iter7_lengths(n: int, seed: int) -> np.ndarray:
    """Row lengths (positions) shaped like iter7's: prompt ~30 tokens + target ~52, mean ~82."""
    rng = np.random.default_rng(seed)
    return (rng.normal(30, 8, n).clip(8) + rng.lognormal(math.log(48), 0.45, n)).astype(np.int64)


# ---- the packer -----------------------------------------------------------------------------------
def test_best_fit_places_every_row_once_and_closes_a_window_only_when_nothing_fits() -> None:
    rng = np.random.default_rng(0)
    lengths = rng.integers(0, 70, 500)  # zeros: rows with nothing to predict stay out
    order = rng.permutation(500)
    windows = pack_windows(lengths, order, 160, lookahead=1000)  # buffer >= rows: exact best fit
    placed = np.concatenate(windows)
    assert sorted(placed.tolist()) == sorted(np.flatnonzero(lengths > 0).tolist())
    assert all(lengths[w].sum() <= 160 for w in windows)
    for i, w in enumerate(windows[:-1]):  # closed only when no row still waiting could fill its room
        later = np.concatenate(windows[i + 1:])
        assert 160 - lengths[w].sum() < lengths[later].min()
    assert [w.tolist() for w in pack_windows(lengths, order, 160, lookahead=1000)] == [w.tolist() for w in windows]
    with pytest.raises(ValueError, match="more than seq_len 60"):
        pack_windows(lengths, order, 60)


@pytest.mark.parametrize("shape", ["iter7", "smoke"])
def test_packing_efficiency_is_at_least_95_percent(shape: str) -> None:
    """Whole rows only: a row longer than half a window mostly travels alone, so the window must be a few
    rows long (smoke's rows are ~107 +- 27 positions: 80-85% at seq_len 160, 97% at 512; bench/packing.py)."""
    if shape == "iter7":  # ~7,000 train rows of ~82 tokens in windows of 2048
        lengths, seq_len = iter7_lengths(7000, seed=1), 2048
    else:  # smoke's row lengths, seq_len 512
        lengths, seq_len = np.random.default_rng(2).normal(107, 27, 1350).clip(40, 161).astype(np.int64), 512
    stream = WindowStream(lengths, seq_len, seed=3)
    windows = stream.epoch(0)
    efficiency = lengths.sum() / (len(windows) * seq_len)  # every row once per epoch: real positions / positions
    assert efficiency == pytest.approx(packing_efficiency(lengths, windows, seq_len))
    assert efficiency >= 0.95, efficiency
    padded = lengths.mean() / seq_len  # one row per sequence
    assert padded < 0.25


def test_window_stream_is_a_pure_function_of_the_step() -> None:
    lengths = np.random.default_rng(4).integers(1, 60, 90)
    stream = WindowStream(lengths, 150, seed=5)
    sequential = [stream.batch(s, 4) for s in range(40)]  # ~20 windows an epoch: crosses several epochs
    resumed = WindowStream(lengths, 150, seed=5).batch(33, 4)  # a fresh stream, straight to step 33
    assert [w.tolist() for w in resumed] == [w.tolist() for w in sequential[33]]
    for e in range(3):  # each epoch holds every row exactly once
        assert sorted(np.concatenate(stream.epoch(e)).tolist()) == list(range(90))
    assert [w.tolist() for w in stream.epoch(0)] != [w.tolist() for w in stream.epoch(1)]  # re-packed per epoch
    other = WindowStream(lengths, 150, seed=6).batch(0, 4)
    assert [w.tolist() for w in other] != [w.tolist() for w in sequential[0]]


def test_a_window_lays_out_each_row_as_it_is_alone() -> None:
    rows = random_rows(30, seed=6)
    lengths = row_positions(rows, T)
    windows = pack_windows(lengths, range(30), T)
    slots, tiles = window_slots(lengths, T), tile_slots(lengths, T)
    batch = make_window_batch(rows, windows, T, PAD, slots, tiles)
    n_tiles, span = tiling(T)
    assert batch["channels"].shape == (len(windows), slots, C, D) and batch["row_tiles"].shape[1:] == (n_tiles, tiles)
    for b, window in enumerate(windows):
        at = 0
        for slot, r in enumerate(window):
            alone = make_batch(rows, np.array([r]), T, PAD)
            n = int(lengths[r])
            for key in ("idx", "targets", "loss_mask"):
                assert torch.equal(batch[key][b, at:at + n], alone[key][0, :n])
            assert (batch["row_ids"][b, at:at + n] == slot).all()
            assert batch["positions"][b, at:at + n].tolist() == list(range(n))
            assert torch.equal(batch["channels"][b, slot], alone["channels"][0])
            at += n
        assert (batch["row_ids"][b, at:] == PAD_ROW).all() and batch["loss_mask"][b, at:].sum() == 0
        assert (batch["channels"][b, len(window):] == 0).all()
        assert batch["target_bytes"][b] == rows.target_bytes[window].sum()
        for i in range(n_tiles):  # every row a tile touches is among the slots it lists
            touched = set(batch["row_ids"][b, i * span:(i + 1) * span].tolist()) - {PAD_ROW}
            assert touched <= set(batch["row_tiles"][b, i].tolist())


# ---- nothing crosses a row ---------------------------------------------------------------------------
def test_every_architecture_reads_windows_or_trains_per_row() -> None:
    """The adapter's frozen base may be a Hugging Face model whose attention takes no row mask from us:
    it trains one row per sequence. Every other registered architecture reads packed windows."""
    assert set(ARCHITECTURES) - set(PACKED_ARCHS) == {"adapter"}
    assert getattr(AdapterLM, "packs_rows", False) is False
    for spec in PACKED_ARCHS.values():
        assert build(spec, vocab_size=V, seq_len=T, channel_names=NAMES, channel_dim=D).packs_rows


@pytest.mark.parametrize("arch", sorted(PACKED_ARCHS))
def test_no_row_reads_another_in_its_window(arch: str) -> None:
    """Changing row A (its tokens and channels) leaves every logit of the other rows bit-identical; and
    every row of a window gets the logits it gets alone, positions restarting at 0."""
    rows = random_rows(24, seed=7)
    lengths = row_positions(rows, T)
    windows = pack_windows(lengths, range(24), T)
    slots, tiles = window_slots(lengths, T), tile_slots(lengths, T)
    model = scrambled(arch)
    batch = make_window_batch(rows, windows, T, PAD, slots, tiles)
    with torch.no_grad():
        base = model(batch["idx"], batch["channels"], window=Window.of(batch))[0]
        b = 0
        row_ids = batch["row_ids"][b]
        for victim in range(len(windows[b])):
            changed = {k: v.clone() for k, v in batch.items()}
            here = row_ids == victim
            changed["idx"][b, here] = (changed["idx"][b, here] + 1) % V
            changed["channels"][b, victim] += 3.0
            out = model(changed["idx"], changed["channels"], window=Window.of(changed))[0]
            others = (row_ids != victim) & (row_ids != PAD_ROW)
            assert torch.equal(out[b, others], base[b, others]), f"{arch}: row {victim} reached another row"
            assert not torch.equal(out[b, here], base[b, here])  # the probe changes the row it edits
            assert torch.equal(out[1:], base[1:])  # nor any other window
        worst = 0.0
        for w, window in enumerate(windows):
            at = 0
            for r in window:
                alone = make_batch(rows, np.array([r]), T, PAD)
                logits = model(alone["idx"], alone["channels"])[0][0, :lengths[r]]
                worst = max(worst, float((logits - base[w, at:at + lengths[r]]).abs().max()))
                at += lengths[r]
    assert worst < 1e-4, f"{arch}: a row in a window differs from the row alone by {worst}"


def test_the_probe_catches_attention_across_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same check against a model whose attention mask ignores rows (plain causal): it must fail."""
    monkeypatch.setattr(gpt, "same_row_causal_mask", lambda row_ids: None)
    rows = random_rows(24, seed=7)
    lengths = row_positions(rows, T)
    windows = pack_windows(lengths, range(24), T)
    batch = make_window_batch(rows, windows, T, PAD, window_slots(lengths, T), tile_slots(lengths, T))
    model = scrambled("baseline")
    changed = {k: v.clone() for k, v in batch.items()}
    first = batch["row_ids"][0] == 0
    changed["idx"][0, first] = (changed["idx"][0, first] + 1) % V
    with torch.no_grad():
        a = model(batch["idx"], batch["channels"], window=Window.of(batch))[0]
        b = model(changed["idx"], changed["channels"], window=Window.of(changed))[0]
    later = batch["row_ids"][0] == 1
    assert not torch.equal(a[0, later], b[0, later])


# ---- loss only at targets ----------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["native", "vocab_conv"])
def test_target_only_head_equals_the_full_logit_loss(arch: str, monkeypatch: pytest.MonkeyPatch) -> None:
    rows = random_rows(24, seed=8)
    lengths = row_positions(rows, T)
    batch = make_window_batch(rows, pack_windows(lengths, range(24), T), T, PAD, window_slots(lengths, T),
                              tile_slots(lengths, T))
    args = (batch["idx"], batch["channels"], batch["targets"], batch["loss_mask"])
    model = scrambled(arch).train()
    logits, full = model(*args, window=Window.of(batch))
    want = F.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten(), reduction="none")
    want = (want * batch["loss_mask"].flatten()).sum() / batch["loss_mask"].sum()  # by hand, from every logit
    torch.testing.assert_close(full, want)
    full.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    monkeypatch.setattr(gpt, "HEAD_CHUNK_LOGITS", 7 * V)  # chunks of 7 positions: the chunked sum too
    seen: list[torch.Size] = []
    head = model.lm_head if arch == "native" else None
    hook = head.register_forward_hook(lambda m, i, o: seen.append(o.shape)) if head is not None else None
    none, only = model(*args, window=Window.of(batch), return_logits=False)
    if hook is not None:
        hook.remove()
        assert sum(s[0] for s in seen) == int(batch["loss_mask"].sum()) and max(s[0] for s in seen) == 7
    assert none is None
    torch.testing.assert_close(only, full, rtol=1e-5, atol=1e-6)
    only.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-6)


def test_head_logits_are_bf16_under_autocast_and_only_at_targets() -> None:
    rows = random_rows(12, seed=9)
    lengths = row_positions(rows, T)
    batch = make_window_batch(rows, pack_windows(lengths, range(12), T), T, PAD, window_slots(lengths, T),
                              tile_slots(lengths, T))
    model = scrambled("native")
    seen: list[torch.Tensor] = []
    model.lm_head.register_forward_hook(lambda m, i, o: seen.append(o))
    args = (batch["idx"], batch["channels"], batch["targets"], batch["loss_mask"])
    want = model(*args, window=Window.of(batch), return_logits=False)[1]
    seen.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss = model(*args, window=Window.of(batch), return_logits=False)
    assert [o.dtype for o in seen] == [torch.bfloat16] and seen[0].shape == (int(batch["loss_mask"].sum()), V)
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(want.item(), rel=0.03)


# ---- numbers unchanged -------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", sorted(PACKED_ARCHS))
def test_heldout_loss_is_the_same_packed_or_per_row(arch: str) -> None:
    rows = random_rows(40, seed=10)
    model = scrambled(arch)
    kw = {"batch_size": 3, "seq_len": T, "pad_id": PAD}
    for zero in (False, True):
        per_row = heldout_loss(model, rows, **kw, zero_channels=zero, packed=False)
        packed = heldout_loss(model, rows, **kw, zero_channels=zero, packed=True)
        assert packed["tokens"] == per_row["tokens"] == sum(int(m[1:].sum()) for m in rows.loss_mask)
        assert packed["total_nats"] == pytest.approx(per_row["total_nats"], rel=1e-5)
        assert packed["bits_per_byte"] == pytest.approx(per_row["bits_per_byte"], rel=1e-5)


BERNOULLI = 0.85  # P(target 5) when the affect channel is positive; P(6) when negative


def bernoulli_rows(n: int, seed: int) -> tuple[list[dict], float]:
    """Rows whose target token is drawn from the channel's sign (noise prompt); returns the rows and the
    Bayes held-out loss: the true probabilities' nats over the target token and eos, per target token."""
    rng = np.random.default_rng(seed)
    rows, nats = [], 0.0
    for i in range(n):
        channels = np.zeros((C, D), np.float32)
        sign = rng.choice([-1.0, 1.0])
        channels[1, 0] = sign
        p5 = BERNOULLI if sign > 0 else 1 - BERNOULLI
        target = 5 if rng.random() < p5 else 6
        nats -= math.log(p5 if target == 5 else 1 - p5)  # eos after the target: probability 1, 0 nats
        rows.append({"row_id": f"r{i}", "prompt_id": f"p{i}", "capability": "affect",
                     "input_ids": [BOS, *rng.integers(7, V, 3).tolist(), TGT, target, EOS],
                     "loss_mask": [0] * 5 + [1, 1], "channels": channels.reshape(-1).tolist(), "target_bytes": 2})
    return rows, nats / (2 * n)


def test_padded_and_packed_training_reach_the_same_heldout_loss(tmp_path) -> None:
    """The same rows per step (16: sixteen padded rows, or eight windows of two 6-position rows in 16)
    and the same steps: both reach the Bayes loss of the held-out rows, which needs each row's channel."""
    train_rows, _ = bernoulli_rows(256, seed=0)
    held_rows, bayes = bernoulli_rows(128, seed=1)
    write_shard(tmp_path / "t.parquet", train_rows)
    write_shard(tmp_path / "h.parquet", held_rows)
    data, held = (load_split([tmp_path / f"{s}.parquet"], channel_dim=D) for s in ("t", "h"))
    spec = {"arch": "native", "n_layer": 1, "n_head": 2, "d_model": 16, "channel_tokens": 1}
    results = {}
    for packing, batch_size in ((False, 16), (True, 8)):
        cfg = TrainRecipe(steps=100, batch_size=batch_size, lr=1e-2, warmup_steps=5, weight_decay=0.0, log_every=100,
                          eval_every=100, seed=0, gate_lr_mult=10.0, packing=packing)
        model = build(spec, vocab_size=V, seq_len=16, channel_names=NAMES, channel_dim=D, seed=1)
        summary = train(model, data, held, cfg, tmp_path / str(packing), pad_id=PAD, log=lambda _: None)
        assert summary["timing"]["packed"] is packing and summary["timing"]["real_tokens"] == 100 * 16 * 6
        results[packing] = summary["final_heldout_loss"]
    blind = math.log(2) / 2  # the best a model can do without the channel
    assert all(loss < (bayes + blind) / 2 for loss in results.values()), (results, bayes, blind)
    assert results[True] == pytest.approx(results[False], abs=0.03), results


def test_tokens_per_second_counts_real_tokens(tmp_path) -> None:
    rows = random_rows(60, seed=11, longest=30)
    cfg = TrainRecipe(steps=3, batch_size=4, lr=1e-3, warmup_steps=1, weight_decay=0.0, log_every=1, eval_every=10,
                      seed=2)
    model = build(PACKED_ARCHS["baseline"], vocab_size=V, seq_len=T, seed=0)
    summary = train(model, rows, None, cfg, tmp_path, pad_id=PAD, log=lambda _: None)
    batches = TrainBatches(rows, T, PAD, seed=2, packed=True)
    real = sum(int((batches.make(batches.units(s, 4))["row_ids"] >= 0).sum()) for s in range(3))
    assert summary["timing"]["real_tokens"] == real < 3 * 4 * T  # positions holding a token, not batch x seq_len


def test_compiled_packed_step_keeps_one_graph() -> None:
    """torch.compile (what iter7 runs): windows with different target counts reuse the trunk's graph, the
    target-only head running eagerly after it."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    rows = random_rows(60, seed=12)
    spec = {**PACKED_ARCHS["native"], "n_layer": 1}
    model = build(spec, vocab_size=V, seq_len=T, channel_names=NAMES, channel_dim=D, seed=0)
    step = torch.compile(model, dynamic=False, backend="aot_eager")
    batches = TrainBatches(rows, T, PAD, seed=0, packed=True)
    counts = set()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for s in range(3):
            b = batches.make(batches.units(s, 2))
            counts.add(int(b["loss_mask"].sum()))
            _, loss = step(b["idx"], b["channels"], b["targets"], b["loss_mask"], window=Window.of(b),
                           return_logits=False)
            loss.backward()
    assert len(counts) > 1 and counters["stats"]["unique_graphs"] >= 1
