"""Vocabulary-space models (issue 7 part 4): no future leak, the reference's parameter counts, training, generation.

The reference project's best headline number came from a causal-mask bug that let its model see
future tokens, so every vocabulary-space architecture in the registry is checked here: changing
the token at t+1 must leave the logits at every position <= t bit-for-bit unchanged.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.architectures import ARCHITECTURES, build, count_params
from models.data import PackedRows
from models.generate import generate
from models.trainer import train
from models.vocab_common import VocabLM
from tinymars.profile import TrainRecipe

V, T = 64, 12
VOCAB_ARCHS = sorted(a for a in ARCHITECTURES if a.startswith("vocab_"))
SMALL = {"vocab_graph": {"arch": "vocab_graph", "rank": 4, "hops": 3},
         "vocab_conv": {"arch": "vocab_conv", "hops": 3, "kernel": 4, "fourier_basis": 4, "op_width": 16}}


def make(arch: str, vocab: int = V, seed: int = 0) -> VocabLM:
    return build(SMALL.get(arch, {"arch": arch}), vocab_size=vocab, seq_len=T, seed=seed)


def test_every_vocab_arch_is_covered():
    assert {"vocab_graph", "vocab_conv"} <= set(VOCAB_ARCHS)
    for arch in VOCAB_ARCHS:
        assert isinstance(make(arch), VocabLM), arch


def _scramble(model: VocabLM) -> None:
    """Random non-trivial weights, so no term is zero by initialisation (a leak would then show)."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3 + (0.5 if p.dim() == 0 else 0.0))


@pytest.mark.parametrize("arch", VOCAB_ARCHS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "bf16-autocast"])
def test_no_future_leak(arch, dtype):
    model = make(arch).eval()
    _scramble(model)
    if dtype == "bfloat16":
        model = model.to(torch.bfloat16)
    gen = torch.Generator().manual_seed(2)
    idx = torch.randint(0, V, (3, T), generator=gen)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16-autocast" else torch.no_grad()
    with torch.no_grad(), ctx:
        base, _ = model(idx)
        assert base.dtype == torch.float32 and base.shape == (3, T, V)
        for t in range(T - 1):
            changed = idx.clone()
            changed[:, t + 1] = (changed[:, t + 1] + 1 + torch.arange(3)) % V  # a different token in every row
            logits, _ = model(changed)
            assert torch.equal(logits[:, : t + 1], base[:, : t + 1]), f"{arch} {dtype}: position <= {t} saw t+1"
            assert not torch.equal(logits[:, t + 1], base[:, t + 1]), f"{arch}: the changed token had no effect"


def test_parameter_counts_match_the_reference_formulas():
    """Written out from the architecture (per hop), then compared with the reference's 164K and 353K."""
    v = 1024
    r, hops = 8, 8
    # per hop: U, V (2 V r) + diag, bias, q scale, k scale (4 V) + decay, 2 out scales, 2 residual scales (5)
    graph_formula = hops * (2 * v * r + 4 * v + 5) + 1  # + the logit scale
    graph = build({"arch": "vocab_graph", "rank": r, "hops": hops}, vocab_size=v, seq_len=T)
    assert count_params(graph) == graph_formula == 163_881
    assert abs(graph_formula / 164_000 - 1) < 0.01

    k, n_basis, width = 16, 16, 128
    # per hop: conv taps (V k) + conv bias (V) + conv/op residual scales (2 V)
    #        + read and write coefficients (2 width 2 n_basis) + mix (width^2) + bias (width) + out scale (1)
    conv_formula = hops * (v * k + v + 2 * v + 2 * width * 2 * n_basis + width * width + width + 1) + 1
    conv = build({"arch": "vocab_conv"}, vocab_size=v, seq_len=T)  # the defaults are the reference's
    assert count_params(conv) == conv_formula == 353_289
    assert abs(conv_formula / 353_000 - 1) < 0.01


def test_hidden_state_is_the_vocabulary():
    """No embedding, no output projection: no parameter maps V to another width and back."""
    for arch in VOCAB_ARCHS:
        model = make(arch)
        assert not any(isinstance(m, torch.nn.Embedding | torch.nn.Linear) for m in model.modules())
        _scramble(model)
        with torch.no_grad():
            logits, _ = model(torch.randint(0, V, (2, T)))
        assert logits.abs().max() <= model.cap + 1e-4  # softcapped


def test_builder_rejects_unknown_keys_and_ignores_channels_like_the_baseline():
    with pytest.raises(ValueError, match="unknown model spec key 'n_layer'.*allowed"):
        build({"arch": "vocab_graph", "n_layer": 2}, vocab_size=V, seq_len=T)
    with pytest.raises(ValueError, match="unknown model spec key 'rank'"):
        build({"arch": "vocab_conv", "rank": 2}, vocab_size=V, seq_len=T)
    plain = build(SMALL["vocab_conv"], vocab_size=V, seq_len=T, seed=5)
    with_channels = build(SMALL["vocab_conv"], vocab_size=V, seq_len=T, channel_names=("affect",), channel_dim=2,
                          seed=5)
    assert count_params(plain) == count_params(with_channels)
    idx = torch.randint(0, V, (2, T))
    a, _ = with_channels(idx, torch.randn(2, 1, 2))
    b, _ = with_channels(idx, None)
    assert torch.equal(a, b)


def _rows(n: int, seed: int) -> PackedRows:
    """Rows of a learnable toy language: each token is the previous one + 1 (mod V), all positions targets."""
    rng = np.random.default_rng(seed)
    ids = [((rng.integers(0, V) + np.arange(T + 1)) % V).astype(np.int32) for _ in range(n)]
    return PackedRows([f"r{i}" for i in range(n)], [f"p{i}" for i in range(n)], ["toy"] * n, ids,
                      [np.ones(T + 1, np.int8) for _ in range(n)], np.zeros((n, 0, 0), np.float32),
                      np.full(n, T, np.int64))


@pytest.mark.parametrize("arch", VOCAB_ARCHS)
def test_the_trainer_lowers_the_loss(arch, tmp_path):
    model = make(arch)
    cfg = TrainRecipe(steps=30, batch_size=8, lr=0.02, warmup_steps=2, weight_decay=0.0, log_every=30,
                      eval_every=30, seed=0)
    heldout = _rows(16, seed=1)
    from models.trainer import heldout_loss

    before = heldout_loss(model, heldout, 8, T, pad_id=0)["nats_per_token"]
    summary = train(model, _rows(64, seed=0), heldout, cfg, tmp_path, pad_id=0, log=lambda _: None)
    assert summary["final_heldout_loss"] < 0.8 * before, (before, summary["final_heldout_loss"])
    assert (tmp_path / "model.safetensors").is_file()
    from models.checkpoint import load_model

    reloaded = load_model(tmp_path)  # rebuilt through the registry from model.json
    idx = torch.randint(0, V, (2, T))
    assert torch.equal(reloaded(idx)[0], model.eval()(idx)[0])


@pytest.mark.parametrize("arch", VOCAB_ARCHS)
@pytest.mark.parametrize("fixed", [False, True])
def test_generation_with_left_padding_matches_full_recompute(arch, fixed):
    """A padded row decodes as the row alone; the token cache gives what recomputing the whole prefix gives."""
    model = make(arch)
    _scramble(model)
    prompts = [[5, 9, 2], [7, 1, 3, 3, 8, 4], [11]]
    out = generate(model, prompts, None, 5, eos_id=-1, pad_id=0, batch_size=3, fixed_shape=fixed)
    for p, o in zip(prompts, out, strict=True):
        seq = list(p)
        for _ in range(5):
            with torch.no_grad():
                logits, _ = model(torch.tensor([seq]))
            seq.append(int(logits[0, -1].argmax()))
        assert o == seq[len(p):], (arch, p)
