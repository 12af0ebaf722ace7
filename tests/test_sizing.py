"""Honest model sizing: channel encoders sized per channel, every counted parameter trains, and the
bracketing baselines land about 10% either side of the native at its depth.

Counts are checked against hand-written formulas of the architecture (not against the code's own
counter), and the bracket search against a brute-force scan of those formulas.
"""

from __future__ import annotations

import pytest
import torch

from models.architectures import build, count_params, count_trainable
from models.checkpoint import load_model, save_model
from models.gpt import ChannelEncoder
from models.sizing import bracket_baseline, channel_widths, count_spec_params, profile_specs, registry_specs
from tinymars.profile import load_profile

NAMES = ("memory", "affect", "time", "ethics")
DIMS = (8, 2, 8, 3)  # two equal widths apart (memory, time): grouping and the channel order are exercised
D, K, V, T = max(DIMS), 2, 16, 12
TINY = {"arch": "native", "n_layer": 2, "n_head": 2, "d_model": 16, "channel_tokens": K, "channel_dims": list(DIMS)}
KW = {"vocab_size": V, "seq_len": T, "channel_names": NAMES, "channel_dim": D}


def padded_channels(batch: int, generator: torch.Generator, padding: float = 0.0) -> torch.Tensor:
    """[B,C,D] random channel vectors, each channel's entries past its own width set to `padding`."""
    x = torch.randn(batch, len(DIMS), D, generator=generator)
    for c, d in enumerate(DIMS):
        x[:, c, d:] = padding
    return x


# ---- the encoder ---------------------------------------------------------------------------------------
def test_encoder_uses_every_weight_once_for_a_real_input_and_ignores_padding() -> None:
    """Read the encoder's Jacobian one input at a time: each (channel, real dim) owns K*M weights, the
    weights of all of them together are the parameter exactly once, padding and other channels give 0."""
    M = 3
    enc = ChannelEncoder(len(DIMS), D, K, M, channel_dims=DIMS)
    assert count_params(enc) == sum(DIMS) * K * M
    with torch.no_grad():
        enc.weight.copy_(torch.arange(1, enc.weight.numel() + 1, dtype=torch.float32).view_as(enc.weight))
    blocks = {}
    for c in range(len(DIMS)):
        for d in range(D):
            x = torch.zeros(1, len(DIMS), D)
            x[0, c, d] = 1.0
            out = enc(x)[0]  # [C,K,M]
            others = torch.cat([out[:c], out[c + 1:]])
            assert torch.count_nonzero(others) == 0, f"channel {c} input {d} leaks into another channel"
            if d >= DIMS[c]:
                assert torch.count_nonzero(out) == 0, f"channel {c} reads its padding at {d}"
            else:
                blocks[c, d] = out[c]
    used = torch.cat([b.flatten() for b in blocks.values()]).sort().values
    assert torch.equal(used, enc.weight.detach().flatten().sort().values)  # each weight once, none unused
    x = padded_channels(5, torch.Generator().manual_seed(0), padding=7.0)  # loud padding is ignored too
    want = torch.stack([sum(x[:, c, d, None, None] * blocks[c, d] for d in range(DIMS[c]))
                        for c in range(len(DIMS))], dim=1)
    torch.testing.assert_close(enc(x), want)


def test_encoder_rejects_channels_of_another_shape() -> None:
    enc = ChannelEncoder(len(DIMS), D, K, 4, channel_dims=DIMS)
    with pytest.raises(ValueError, match=r"takes C = 4 channels zero-padded to D = 8"):
        enc(torch.zeros(2, 4, 6))
    with pytest.raises(ValueError, match=r"channel_dims \[8, 9\]: give one width in 1\.\.8"):
        ChannelEncoder(2, D, K, 4, channel_dims=(8, 9))
    with pytest.raises(ValueError, match=r"needs one width per channel"):
        build({**TINY, "channel_dims": [8, 2]}, **KW)


# ---- no dead weights -----------------------------------------------------------------------------------
def dead_elements(model: torch.nn.Module, seeds: tuple[int, ...] = (0, 1)) -> dict[str, int]:
    """Per parameter, the elements whose gradient is exactly 0 after one forward/backward, in every one of
    a few independent draws of all weights and a batch that uses every token.

    The weights are drawn at random because the real init zeroes residual projections and gates on purpose,
    which holds gradients back for a step. One draw can leave a ReLU unit off for the whole batch; a weight
    that gets no gradient in independent draws is structurally dead.
    """
    dead: dict[str, torch.Tensor] = {}
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * (p.shape[-1] ** -0.5 if p.dim() > 1 else 0.5))
        model.zero_grad()
        idx = torch.arange(4 * T).remainder(V).view(4, T)  # every token id occurs: every embedding row is read
        _, loss = model.train()(idx, padded_channels(4, g), idx.roll(-1, 1), None)
        loss.backward()
        for name, p in model.named_parameters():
            zero = p.grad == 0 if p.grad is not None else torch.ones_like(p, dtype=torch.bool)
            dead[name] = dead.get(name, zero) & zero
    return {name: int(mask.sum()) for name, mask in dead.items()}


def test_every_counted_parameter_is_trainable_and_gets_a_gradient() -> None:
    model = build(TINY, **KW, seed=0)
    assert count_params(model) == count_trainable(model) == count_spec_params(TINY, **KW)
    assert {n: k for n, k in dead_elements(model).items() if k} == {}
    # the test can fail: the old layout, every channel padded to D, has exactly the padding's weights dead
    padded = build({**TINY, "channel_dims": [D] * len(DIMS)}, **KW, seed=0)
    assert count_params(padded) - count_params(model) == sum(D - d for d in DIMS) * K * TINY["d_model"]
    assert {n: k for n, k in dead_elements(padded).items() if k} == {
        "encoder.weight": sum(D - d for d in DIMS) * K * TINY["d_model"]}


def test_a_per_channel_native_saves_and_loads(tmp_path) -> None:
    model = build(TINY, **KW, seed=3).eval()
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert loaded.cfg.channel_dims == DIMS and loaded.build_info["spec"]["channel_dims"] == list(DIMS)
    idx, x = torch.randint(0, V, (2, T)), padded_channels(2, torch.Generator().manual_seed(1))
    torch.testing.assert_close(loaded(idx, x)[0], model(idx, x)[0], rtol=0, atol=0)


# ---- counts and brackets, against the architecture's formulas ----------------------------------------
def decoder_params(vocab: int, n_layer: int, width: int, channel_dims: tuple[int, ...] = (), tokens: int = 0) -> int:
    """By hand: untied embedding + head 2VM; per block attention 4M^2 and a 4x MLP 8M^2, and with channels
    a cross-attention 4M^2 plus one gate per channel; the encoder sum(D_c) x K x M. No biases, no norms."""
    C = len(channel_dims)
    block = 12 * width**2 + (4 * width**2 + C if C else 0)
    return 2 * vocab * width + n_layer * block + sum(channel_dims) * tokens * width


@pytest.mark.parametrize("vocab", [None, 32000])  # the profile's own, and the 32k of issue 14
def test_iter7_baselines_bracket_the_native_at_its_depth(vocab: int | None) -> None:
    prof = load_profile("iter7", [f"tokenizer.vocab_size={vocab}"] if vocab else [])
    specs = profile_specs(prof)
    V7, dims = prof.tokenizer.vocab_size, tuple(spec.dim for spec in prof.channels.enabled.values())
    kw = {"vocab_size": V7, "seq_len": prof.pack.seq_len, "channel_names": prof.channels.names,
          "channel_dim": prof.channels.max_dim}
    native = specs["native"]
    assert native["channel_dims"] == list(dims)
    n = decoder_params(V7, native["n_layer"], native["d_model"], dims, native["channel_tokens"])
    assert count_spec_params(native, **kw) == n
    with torch.device("meta"):
        assert count_trainable(build(native, **kw)) == n  # every counted parameter trainable
    lo, hi = specs["baseline-below"], specs["baseline-above"]
    p_lo, p_hi = (decoder_params(V7, s["n_layer"], s["d_model"]) for s in (lo, hi))
    assert (count_spec_params(lo, **kw), count_spec_params(hi, **kw)) == (p_lo, p_hi)
    assert -0.15 <= p_lo / n - 1 < 0 < p_hi / n - 1 <= 0.15
    assert lo["n_layer"] == hi["n_layer"] == native["n_layer"] and lo["n_head"] == hi["n_head"] == native["n_head"]
    step = 2 * native["n_head"]  # brute force: the width on each side nearest -10% / +10%
    widths = range(step, 4 * native["d_model"], step)
    below = [w for w in widths if decoder_params(V7, native["n_layer"], w) < n]
    above = [w for w in widths if decoder_params(V7, native["n_layer"], w) > n]
    assert lo["d_model"] == min(below, key=lambda w: abs(decoder_params(V7, native["n_layer"], w) - 0.9 * n))
    assert hi["d_model"] == min(above, key=lambda w: abs(decoder_params(V7, native["n_layer"], w) - 1.1 * n))


def test_bracket_sizes_what_the_entry_leaves_out() -> None:
    native = {k: v for k, v in TINY.items()}
    n = count_spec_params(native, **KW)
    base = {"arch": "baseline", "n_head": 2}
    deep = bracket_baseline(native, {**base, "d_model": 16}, "above", **KW)  # width given: the depth is sized
    assert deep["d_model"] == 16 and count_spec_params(deep, **KW) > n
    depths = [L for L in range(1, 40) if decoder_params(V, L, 16) > n]
    assert deep["n_layer"] == min(depths, key=lambda L: abs(decoder_params(V, L, 16) - 1.1 * n))
    wide = bracket_baseline(native, {**base, "n_layer": 1}, "below", **KW)  # depth given: the width is sized
    widths = [w for w in range(4, 200, 4) if decoder_params(V, 1, w) < n]
    assert wide["n_layer"] == 1 and wide["d_model"] == min(widths, key=lambda w: abs(decoder_params(V, 1, w) - 0.9 * n))
    with pytest.raises(ValueError, match="give at most one of them"):
        bracket_baseline(native, {**base, "n_layer": 1, "d_model": 16}, "below", **KW)
    with pytest.raises(ValueError, match="no baseline is smaller than the native"):
        bracket_baseline(native, {**base, "d_model": 256}, "below", **KW)


def test_registry_specs_give_natives_their_channel_widths_and_name_a_bad_bracket() -> None:
    entries = [{"name": "native", **{k: v for k, v in TINY.items() if k not in ("channel_tokens", "channel_dims")}},
               {"name": "lo", "arch": "baseline", "bracket": "below"}]
    specs = registry_specs(entries, **KW, channel_tokens=K, channel_dims=DIMS)
    assert specs["native"]["channel_dims"] == list(DIMS) and "channel_dims" not in specs["lo"]
    assert specs["lo"]["n_layer"] == TINY["n_layer"] and count_spec_params(specs["lo"], **KW) < count_spec_params(
        specs["native"], **KW)
    with pytest.raises(ValueError, match=r"model 'lo' \(bracket: below\): no baseline is smaller"):
        registry_specs([entries[0], {**entries[1], "d_model": 512}], **KW, channel_tokens=K, channel_dims=DIMS)
    prof = load_profile("tiny")
    meta = {"vocab_size": 1000, "seq_len": 64, "channel_names": ["memory", "affect"], "channel_dim": 384}
    assert channel_widths(prof, meta) == [384, 2]  # the profile's widths fill the pack's
    assert channel_widths(prof, {**meta, "channel_dims": [300, 2]}) == [300, 2]  # a pack that records them
    assert channel_widths(prof, {**meta, "channel_dim": 8}) is None  # data made for other widths: padded layout
    assert profile_specs(prof, meta)["native"]["channel_dims"] == [384, 2]
    with pytest.raises(ValueError, match=r"channels \['mood'\] that channels.enabled does not list"):
        profile_specs(prof, {**meta, "channel_names": ["affect", "mood"]})


def test_an_adapter_encoder_is_sized_per_channel_too(tmp_path) -> None:
    save_model(build({"arch": "baseline", "n_layer": 1, "n_head": 2, "d_model": 16}, **KW, seed=0), tmp_path / "b")
    spec = registry_specs([{"name": "a", "arch": "adapter", "base": str(tmp_path / "b")}], **KW, channel_tokens=K,
                          channel_dims=DIMS)["a"]
    model = build(spec, **KW, seed=0)
    assert spec["channel_dims"] == list(DIMS) and model.encoder.weight.numel() == sum(DIMS) * K * 16
    assert count_spec_params(spec, **KW) == count_params(model) == count_trainable(model)
    idx = torch.randint(0, V, (2, T))
    assert model(idx, padded_channels(2, torch.Generator().manual_seed(0)))[0].shape == (2, T, V)
