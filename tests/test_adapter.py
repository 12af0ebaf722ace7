"""The frozen-base adapter track on real Hugging Face code: tiny random GPT-2, Llama and Gemma-3 (with a
vision tower) saved to a temporary folder as the "local HF model", and one of our own trained baselines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_models import NAMES, PAD, C, D, T, V, future_leak, livelier, naive_greedy, sign_rows, tiny, write_shard

from models.adapter import AdapterLM
from models.architectures import build
from models.checkpoint import load_model, save_model
from models.data import load_split
from models.generate import generate
from models.trainer import train
from tinymars.profile import TrainRecipe

BASES = ("gpt2", "llama", "ours")


def hf_model(kind: str):
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    transformers.utils.logging.set_verbosity_error()
    ids = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": PAD}
    if kind == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=T, n_embd=32, n_layer=2, n_head=2, **ids))
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                            **ids))
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration
    from transformers.models.gemma3.configuration_gemma3 import Gemma3TextConfig
    from transformers.models.siglip.configuration_siglip import SiglipVisionConfig

    text = Gemma3TextConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=64,
                            sliding_window=8, **ids)
    vision = SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                image_size=16, patch_size=8)
    return Gemma3ForConditionalGeneration(Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4))


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bases")
    torch.manual_seed(0)
    out = {}
    for kind in ("gpt2", "llama", "gemma3"):
        hf_model(kind).save_pretrained(root / kind)
        out[kind] = root / kind
    save_model(livelier(tiny("baseline", seed=2)), root / "ours")
    out["ours"] = root / "ours"
    return out


def adapter(path: Path, kind: str = "cross_attn", seed: int = 0) -> AdapterLM:
    spec = {"arch": "adapter", "base": str(path), "adapter": kind, "channel_tokens": 2}
    return build(spec, vocab_size=V, seq_len=T, channel_names=NAMES, channel_dim=D, seed=seed).eval()


def base_logits(path: Path, idx: torch.Tensor) -> torch.Tensor:
    """The stock base, loaded on its own: what the adapter must reproduce with its gates at 0."""
    if (path / "model.json").exists():
        return load_model(path)(idx)[0]
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True).eval()(input_ids=idx).logits.float()


def open_gates(model: AdapterLM, value: float = 0.7) -> AdapterLM:
    with torch.no_grad():
        for i, a in enumerate(model.adapters):
            a.gate.copy_(value * torch.linspace(1.0, -0.5, C) * (i + 1))
    return model


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


@pytest.mark.parametrize("kind", ["cross_attn", "film"])
@pytest.mark.parametrize("base", BASES)
def test_gates_at_zero_are_bit_identical_to_the_base(bases, base: str, kind: str) -> None:
    model = adapter(bases[base], kind)
    idx = torch.randint(0, V, (3, T))
    want = base_logits(bases[base], idx)
    with torch.no_grad():
        for channels in (None, torch.zeros(3, C, D), torch.randn(3, C, D) * 5):
            assert torch.equal(model(idx, channels)[0], want)
        open_gates(model)
        assert (model(idx, torch.randn(3, C, D))[0] - want).abs().max() > 1e-3  # the adapters are live
    assert model.alpha_l2() > 0 and model.gate_values().shape == (2, C)


@pytest.mark.parametrize("kind", ["cross_attn", "film"])
@pytest.mark.parametrize("base", BASES)
def test_adapter_is_causal(bases, base: str, kind: str) -> None:
    past, future = future_leak(open_gates(adapter(bases[base], kind)))
    assert past < 1e-5 and future > 1e-4


def test_base_is_frozen_and_kept_out_of_the_state(bases, tmp_path: Path) -> None:
    model = adapter(bases["llama"])
    assert all(not k.startswith("base") for k in model.state_dict())
    assert model.base_params() > 0 and not any(p.requires_grad for p in model.base.parameters())
    frozen = {k: v.clone() for k, v in model.base.state_dict().items()}
    idx = torch.randint(0, V, (4, T))
    _, loss = model.train()(idx, torch.randn(4, C, D), idx, torch.ones(4, T))
    loss.backward()
    assert not model.base.training  # base dropout stays off while the adapter trains
    assert all(a.gate.grad.abs().min() > 0 for a in model.adapters)  # ReZero gates are alive at init
    assert all(p.grad is None for p in model.base.parameters())

    write_shard(tmp_path / "t.parquet", sign_rows(32, seed=0))
    rows = load_split([tmp_path / "t.parquet"], channel_dim=D)
    cfg = TrainRecipe(steps=6, batch_size=8, lr=3e-3, warmup_steps=2, weight_decay=0.1, log_every=3, eval_every=6,
                      seed=0, gate_lr_mult=10.0)
    summary = train(model, rows, rows, cfg, tmp_path / "run", pad_id=PAD, log=lambda s: None)
    assert summary["alpha_l2"] > 0 and summary["arch"] == "adapter"
    assert all(torch.equal(v, frozen[k]) for k, v in model.base.state_dict().items())
    assert json.loads((tmp_path / "run/model.json").read_text())["num_params"] == sum(
        p.numel() for p in model.parameters())
    loaded = load_model(tmp_path / "run")
    ch = torch.randn(4, C, D)
    with torch.no_grad():
        assert torch.equal(loaded(idx, ch)[0], model.eval()(idx, ch)[0])


def test_unused_towers_are_dropped_before_the_device_move(bases) -> None:
    from transformers import AutoModelForCausalLM

    full = AutoModelForCausalLM.from_pretrained(str(bases["gemma3"]), local_files_only=True).eval()
    model = adapter(bases["gemma3"])
    assert sorted(model.base_info["dropped"]) == ["model.multi_modal_projector", "model.vision_tower"]
    assert model.base.model.vision_tower is None
    assert model.base_params() < sum(p.numel() for p in full.parameters())
    idx = torch.randint(0, V, (2, T))
    with torch.no_grad():
        assert torch.equal(model(idx, torch.randn(2, C, D))[0], full(input_ids=idx).logits.float())


@pytest.mark.parametrize("base", ["llama", "ours"])
def test_adapter_generation_equals_naive_recompute(bases, base: str) -> None:
    model = open_gates(adapter(bases[base]))
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, V, (n,), generator=g).tolist() for n in (1, 5, 3, 7)]
    channels = torch.randn(len(prompts), C, D, generator=g)
    want = [naive_greedy(model, p, c, 6, eos_id=-1) for p, c in zip(prompts, channels, strict=True)]
    assert generate(model, prompts, channels, 6, eos_id=-1, pad_id=PAD, batch_size=4) == want


def test_bad_bases_give_clear_errors(bases, tmp_path: Path) -> None:
    kw = {"vocab_size": V, "seq_len": T, "channel_names": NAMES, "channel_dim": D}
    with pytest.raises(ValueError, match="neither one of our model folders"):
        build({"arch": "adapter", "base": str(tmp_path)}, **kw)
    with pytest.raises(ValueError, match="32-token vocabulary but the data was tokenized with 50 tokens"):
        build({"arch": "adapter", "base": str(bases["gpt2"])}, **{**kw, "vocab_size": 50})
    with pytest.raises(ValueError, match="handles 16 positions"):
        build({"arch": "adapter", "base": str(bases["gpt2"])}, **{**kw, "seq_len": 32})
    save_model(tiny("native"), tmp_path / "native")
    with pytest.raises(ValueError, match="is a channel model"):
        build({"arch": "adapter", "base": str(tmp_path / "native")}, **kw)
    with pytest.raises(ValueError, match="'depth'"):
        build({"arch": "adapter", "base": str(bases["gpt2"]), "depth": 3}, **kw)


def test_adapter_sizes_are_counted_without_reading_the_base(bases, monkeypatch) -> None:
    from models.architectures import count_params
    from models.sizing import count_spec_params, registry_specs

    kw = {"vocab_size": V, "seq_len": T, "channel_names": NAMES, "channel_dim": D}
    monkeypatch.chdir(bases["gemma3"].parent)
    spec = registry_specs([{"name": "a", "arch": "adapter", "base": "gemma3", "adapter": "film"}], **kw,
                          channel_tokens=2)["a"]
    assert spec["base"] == str(bases["gemma3"].resolve())  # the trainer may run in another folder
    assert count_spec_params(spec, **kw) == count_params(build(spec, **kw)) == sum(
        p.numel() for p in adapter(bases["gemma3"], "film").parameters())
