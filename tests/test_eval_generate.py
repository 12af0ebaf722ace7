"""Eval generation: seeded sampling, fixed shapes (no recompiles), no-cache reference, the arms' records."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.architectures import build
from models.eval_arms import arm_prompt, followup_prompt, generate_arms
from models.generate import Sampling, generate

V, C, D, PAD, EOS = 97, 2, 8, 0, 3


def lively_model() -> torch.nn.Module:
    """A tiny native model whose gates and outputs are not at their (silent) init values."""
    model = build({"arch": "native", "n_layer": 2, "n_head": 2, "d_model": 32}, vocab_size=V, seq_len=64,
                  channel_names=("a", "b"), channel_dim=D, seed=0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("proj.weight", "gate")) or name == "lm_head.weight":
                p.copy_(torch.randn(p.shape, generator=g) * 0.4)
    return model.eval()


@pytest.fixture(scope="module")
def setup():
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(5, V, (n,), generator=g).tolist() for n in (1, 6, 3, 9, 4, 7, 2)]
    return lively_model(), prompts, torch.randn(len(prompts), C, D, generator=g)


def test_fixed_shape_and_no_cache_equal_dynamic_greedy(setup) -> None:
    model, prompts, ch = setup
    free = generate(model, prompts, ch, 10, -1, PAD, batch_size=3)
    eos = free[1][4]  # a token rows really emit, so some rows stop early and the cut after eos is exercised
    want = generate(model, prompts, ch, 10, eos, PAD, batch_size=3)
    assert any(len(w) < 10 for w in want) and any(len(w) == 10 for w in want)
    assert generate(model, prompts, ch, 10, eos, PAD, batch_size=3, fixed_shape=True) == want
    assert generate(model, prompts, ch, 10, eos, PAD, batch_size=4, fixed_shape=True, prompt_len=12) == want
    assert generate(model, prompts, ch, 10, eos, PAD, batch_size=3, use_cache=False) == want
    assert generate(model, prompts, ch, 10, eos, PAD, sampling=Sampling(temperature=0.0, seed=9)) == want
    assert generate(model, prompts, ch, 10, eos, PAD, sampling=Sampling(temperature=1.0, top_k=1)) == want
    with pytest.raises(ValueError, match="prompt_len"):
        generate(model, prompts, ch, 4, EOS, PAD, fixed_shape=True, prompt_len=5)


def test_seeded_sampling_is_per_row_reproducible(setup) -> None:
    model, prompts, ch = setup
    s = Sampling(temperature=1.2, seed=5)
    first = generate(model, prompts, ch, 12, EOS, PAD, batch_size=3, sampling=s)
    assert first != generate(model, prompts, ch, 12, EOS, PAD, batch_size=3)  # not greedy
    assert generate(model, prompts, ch, 12, EOS, PAD, batch_size=1, sampling=s) == first  # batch independent
    assert generate(model, prompts, ch, 12, EOS, PAD, batch_size=5, sampling=s, fixed_shape=True) == first
    assert generate(model, prompts[:3], ch[:3], 12, EOS, PAD, sampling=s) == first[:3]  # other rows do not matter
    other = generate(model, prompts, ch, 12, EOS, PAD, batch_size=3, sampling=Sampling(temperature=1.2, seed=6))
    assert other != first
    with pytest.raises(ValueError):
        Sampling(temperature=-1.0)


def test_sampling_follows_the_softmax() -> None:
    """Gumbel-max draws match softmax(logits / T) restricted to the top k (a one-step chi-square check)."""
    from scipy.stats import chisquare

    from models.generate import _Picker

    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]]).repeat(4000, 1)
    picks = _Picker(Sampling(temperature=0.7, top_k=3, seed=1), list(range(4000)), 4000)(logits)
    counts = np.bincount(picks.numpy(), minlength=5)
    assert counts[3] == counts[4] == 0
    probs = torch.softmax(logits[0, :3] / 0.7, dim=0).numpy()
    assert chisquare(counts[:3], probs * 4000).pvalue > 1e-3


def test_fixed_shape_decode_compiles_once_per_shape(setup) -> None:
    """torch.compile(fullgraph, static shapes): the prefill and the step compile once each, however many
    steps run (the quick proxy for XLA, where a recompile per step made generation crawl)."""
    model = setup[0]

    def count_graphs(fixed: bool, steps: int) -> int:
        torch._dynamo.reset()
        graphs = []

        def backend(gm, _inputs):
            graphs.append(gm)
            return gm.forward

        decode = torch.compile(model.decode, backend=backend, fullgraph=True, dynamic=False)
        cache = model.new_cache(2, 5 + steps + 1, fixed=fixed)
        idx = torch.randint(5, V, (2, 5))
        with torch.no_grad():
            logits = decode(idx, cache, torch.randn(2, C, D), torch.ones(2, 5, dtype=torch.bool))[:, -1]
            for _ in range(steps):
                logits = decode(logits.argmax(-1)[:, None], cache)[:, -1]
        return len(graphs)

    assert count_graphs(fixed=True, steps=5) == 2
    assert count_graphs(fixed=False, steps=2) > 2  # the growing cache recompiles: the test can fail


class FakeTok:
    """A character tokenizer with the tinymars ids (bos 2, eos 3, target 4): enough to drive generate_arms."""

    pad_id, bos_id, eos_id, target_id = 0, 2, 3, 4

    def prompt_ids(self, text: str) -> list[int]:
        return [self.bos_id, *[5 + ord(c) % (V - 5) for c in text], self.target_id]

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(97 + i % 26) for i in ids)


ROWS = [
    {"row_id": "aff-0000-pos", "prompt_id": "aff-0000", "capability": "affect", "kind": "register", "split": "heldout",
     "prompt": "Plan my day?", "pole": "+", "text_pole": None, "salient_item": None, "items": None,
     "channel_state": {"affect": {"valence": 0.8, "saliency": 0.5}}},
    {"row_id": "mem-0000-b", "prompt_id": "mem-0000", "capability": "memory", "kind": "selection", "split": "heldout",
     "prompt": "Ideas for Ana?", "pole": None, "text_pole": None, "salient_item": 1,
     "items": [{"text": "x", "keys": ["x"]}] * 3,
     "channel_state": {"memory": {"salient_item": 1, "text": "spent a week in Lisbon"}}},
]


def test_arm_prompts_write_the_state_only_for_text() -> None:
    assert arm_prompt(ROWS[0], "mars") == arm_prompt(ROWS[0], "ablated") == arm_prompt(ROWS[0], "steer") == \
        "Plan my day?"
    assert arm_prompt(ROWS[0], "text") == "[state: mood warm, valence +0.80, saliency 0.50] Plan my day?"
    assert arm_prompt(ROWS[1], "text").startswith("[state: salient memory: spent a week in Lisbon] ")
    assert followup_prompt("Q?", " answer ", "Tell me more.") == "Q? answer Tell me more."
    with pytest.raises(ValueError, match="unknown arm"):
        arm_prompt(ROWS[0], "telepathy")


def test_generate_arms_records_every_arm_and_turn() -> None:
    model = lively_model()
    mats = {"a": np.random.default_rng(0).normal(size=(2, 2)).astype(np.float32),
            "b": np.random.default_rng(1).normal(size=(2, D)).astype(np.float32)}
    recs = generate_arms(model, FakeTok(), ROWS, mats, ["a", "b"], D, [0, 1], ["mars", "ablated", "text"], 6, 4,
                         followup_turns=1, followup="More?")
    assert len(recs) == 2 * 3 + 2 * 3  # turn 0: every arm; turn 1: MARS, ABLATED and MARS_CUT
    assert {r["arm"] for r in recs if r["turn"] == 1} == {"mars", "ablated", "mars_cut"}
    assert not any(r["arm"] == "mars_cut" for r in recs if r["turn"] == 0)
    by = {(r["row_id"], r["arm"], r["turn"]): r for r in recs}
    text0, mars0 = by[("aff-0000-pos", "text", 0)], by[("aff-0000-pos", "mars", 0)]
    assert text0["prompt"].startswith("[state: mood warm") and mars0["prompt"] == "Plan my day?"
    assert text0["prompt_tokens"] == len(FakeTok().prompt_ids(text0["prompt"])) > mars0["prompt_tokens"]
    assert (mars0["channel"], text0["channel"], by[("aff-0000-pos", "ablated", 0)]["channel"]) == \
        ("real", "zeroed", "zeroed")
    turn1 = by[("aff-0000-pos", "mars", 1)]
    assert turn1["prompt"] == followup_prompt(mars0["prompt"], mars0["response"], "More?")
    assert turn1["prompt_tokens"] > mars0["prompt_tokens"]
    # MARS_CUT answers the very conversation MARS answers at turn 1, with the channel zeroed
    cut = by[("aff-0000-pos", "mars_cut", 1)]
    assert cut["prompt"] == turn1["prompt"] and cut["channel"] == "zeroed"
    assert any(by[(r["row_id"], "mars", 1)]["response"] != by[(r["row_id"], "mars_cut", 1)]["response"] for r in ROWS)
    assert all(r["response_tokens"] <= 6 and isinstance(r["response"], str) for r in recs)
    # the channel reaches MARS only: with lively gates its responses differ from ABLATED's somewhere
    assert any(by[(r["row_id"], "mars", 0)]["response"] != by[(r["row_id"], "ablated", 0)]["response"] for r in ROWS)


# ------------------------------------------------------------------ eval device and precision
def test_cpu_runtime_leaves_the_greedy_records_unchanged() -> None:
    """The eval runtime on CPU is fp32 with no autocast: every record equals the plain (pre-runtime) path's."""
    from models.generate import eval_runtime

    rt = eval_runtime("cpu")
    assert (rt.kind, rt.bf16, rt.device.type) == ("cpu", False, "cpu")
    mats = {"a": np.random.default_rng(0).normal(size=(2, 2)).astype(np.float32),
            "b": np.random.default_rng(1).normal(size=(2, D)).astype(np.float32)}
    for fixed in (False, True):
        args = (lively_model(), FakeTok(), ROWS, mats, ["a", "b"], D, [0, 1], ["mars", "ablated"], 5, 4)
        kw = dict(followup_turns=1, followup="More?", fixed_shape=fixed)
        torch.manual_seed(0)
        plain = generate_arms(*args, **kw)
        torch.manual_seed(0)
        assert generate_arms(*args, **kw, runtime=rt) == plain


def test_bf16_runtime_decodes_through_a_bf16_cache(setup) -> None:
    """bf16 autocast (what accelerators get): the cache stores bf16 keys/values, and cached decoding, fixed
    shapes and a full recompute every step still agree token for token."""
    from models.generate import eval_runtime

    model, prompts, ch = setup
    rt = eval_runtime("cpu", precision="bf16")
    with rt.autocast():
        assert model.new_cache(2, 5).k.dtype == torch.bfloat16
    assert model.new_cache(2, 5).k.dtype == torch.float32  # outside autocast: the weights' dtype
    want = generate(model, prompts, ch, 6, -1, PAD, batch_size=3, runtime=rt)
    assert generate(model, prompts, ch, 6, -1, PAD, batch_size=3, runtime=rt, use_cache=False) == want
    assert generate(model, prompts, ch, 6, -1, PAD, batch_size=4, runtime=rt, fixed_shape=True) == want
    assert all(len(w) == 6 and all(0 <= t < V for t in w) for w in want)


def test_eval_device_resolution_and_bad_devices() -> None:
    from models.distributed import Runtime, resolve_kind
    from models.generate import eval_kind, eval_runtime

    assert eval_kind("auto", "cpu") == "cpu" and eval_kind("cpu", "cuda") == "cpu"
    assert eval_kind("auto", "auto") == resolve_kind("auto")
    if not torch.cuda.is_available():
        assert eval_kind("auto", "cuda") == "cpu"  # trained on a GPU, evaluated where there is none
        with pytest.raises(ValueError, match="eval.device: 'cuda' needs a CUDA device"):
            eval_kind("cuda", "auto")
    import importlib.util

    if importlib.util.find_spec("torch_xla") is None:
        assert eval_kind("auto", "xla") == resolve_kind("auto")
        with pytest.raises(ValueError, match="eval.device: 'xla' needs torch_xla"):
            eval_kind("xla", "xla")
    with pytest.raises(ValueError, match="precision 'fp16'"):
        eval_runtime("cpu", precision="fp16")
    model = lively_model()
    elsewhere = Runtime("cuda", torch.device("cuda", 0), bf16=True)
    with pytest.raises(ValueError, match=r"model.to\(runtime.device\)"):
        generate(model, [[5, 6]], None, 2, EOS, PAD, runtime=elsewhere)


def test_generate_key_holds_the_resolved_eval_device() -> None:
    from tasks.generate import generate_key_section
    from tinymars.profile import load_profile

    tiny = load_profile("tiny", [])
    assert tiny.train.device == "cpu" and tiny.eval.device == "auto"
    assert generate_key_section(tiny)["device"] == "cpu"
    assert generate_key_section(load_profile("tiny", ["eval.device=cpu"])) == generate_key_section(tiny)


def test_relief_losses_on_the_eval_runtime_match_a_row_by_row_reference() -> None:
    """Packed windows, head at target positions only, on the eval runtime: the same totals as scoring each row
    alone with full logits and a hand-masked cross-entropy."""
    import torch.nn.functional as F

    from models.data import PackedRows
    from models.generate import eval_runtime
    from models.measure import relief_losses

    model, rng = lively_model(), np.random.default_rng(4)
    lengths = [5, 11, 3, 8, 14, 6]
    ids = [rng.integers(5, V, n + 1).astype(np.int32) for n in lengths]
    masks = [(np.arange(n + 1) >= n // 2).astype(np.int8) for n in lengths]
    chans = rng.normal(size=(len(lengths), C, D)).astype(np.float32)
    rows = PackedRows([f"r{i}" for i in range(6)], [f"p{i}" for i in range(6)], ["affect"] * 6, ids, masks, chans,
                      np.full(6, 10, np.int64))
    got = relief_losses({"native": model}, rows, 2, 32, PAD, runtime=eval_runtime("cpu"))["native"]
    assert got == relief_losses({"native": model}, rows, 2, 32, PAD)["native"]  # CPU runtime: the plain fp32 path
    with torch.no_grad():
        for key, zero in (("channels_zeroed", True), ("channels_on", False)):
            nats = tokens = 0.0
            for seq, mask, ch in zip(ids, masks, chans, strict=True):
                c = torch.zeros(1, C, D) if zero else torch.from_numpy(ch)[None]
                logits = model(torch.from_numpy(seq[:-1]).long()[None], c)[0][0]
                ce = F.cross_entropy(logits, torch.from_numpy(seq[1:]).long(), reduction="none")
                nats += float((ce * torch.from_numpy(mask[1:]).float()).sum())
                tokens += float(mask[1:].sum())
            assert got[key]["tokens"] == tokens
            assert got[key]["total_nats"] == pytest.approx(nats, rel=1e-5)
    assert got["channels_on"]["total_nats"] != pytest.approx(got["channels_zeroed"]["total_nats"], rel=1e-4)
