"""The adapter track as an iteration: `tinymars run --profile adapter` on a tiny local HF model built here, offline,
and `tinymars serve-model` on the adapter it trains (the last section).

The base is a 2-block, 32-wide random Llama with a 1,024-id byte-level BPE tokenizer (bos <s>, eos </s>, pad
<pad>), saved where the shipped profile looks for it (./bases/tiny-hf, relative to the working folder).
The corpus and channels are the tiny profile's, so they come from the session's tiny run (copy_home).
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from app.cli import main
from tests.chaos_support import copy_home
from tinymars.lineage import Lineage
from tinymars.profile import ProfileError, load_profile

pytestmark = pytest.mark.slow

BASE = Path("bases") / "tiny-hf"


def _strings(node: object) -> list[str]:
    if isinstance(node, str):
        return [node]
    values = node.values() if isinstance(node, dict) else node if isinstance(node, list) else []
    return [s for v in values for s in _strings(v)]


def build_tiny_hf_base(out: Path) -> Path:
    """A tiny random Llama and a byte-level BPE tokenizer (1,024 ids, trained on the template pools in
    corpus/data in about a second: a 30k-id tokenizer made each training step 30x dearer), saved the way
    `save_pretrained` saves any hub model."""
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    transformers.utils.logging.set_verbosity_error()
    data = Path(__file__).resolve().parents[1] / "corpus" / "data"
    texts = [t for p in sorted(data.glob("*.json")) for t in _strings(json.loads(p.read_text()))]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=1024, special_tokens=["<pad>", "<s>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("adapter-track")
    build_tiny_hf_base(root / BASE)
    return root


@pytest.fixture(scope="module")
def track(workdir, tiny_reference, tmp_path_factory) -> dict:
    """One `tinymars run --profile adapter` from the folder holding ./bases/tiny-hf."""
    home = copy_home(tiny_reference, tmp_path_factory.mktemp("adapter-home") / "home")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(workdir)
        assert main(["run", "--profile", "adapter", "--home", str(home)]) == 0
    lin = Lineage(home / "lineage.duckdb")
    run = lin.runs()[0]  # newest first
    return {"home": home, "run": run, "stages": {s["name"]: s for s in lin.stages(run["run_id"])},
            "arts": {a["name"]: Path(a["path"]) for a in lin.query("SELECT * FROM artifacts")}}


def test_adapter_iteration_runs_end_to_end_with_a_verdict(track, workdir) -> None:
    from transformers import AutoTokenizer

    stages = track["stages"]
    assert track["run"]["status"] == "completed"
    assert list(stages) == ["corpus", "channels", "tokenizer", "pack", "train:native", "train:adapter", "generate",
                            "score", "report"]  # no steer stage: it reads a native
    assert stages["corpus"]["cache_hit"] and stages["channels"]["cache_hit"]  # the tiny run's, shared
    # the tokenizer artifact is the base's own tokenizer: its files and their hashes, no SentencePiece model
    tok_dir = track["arts"]["tokenizer"]
    record = json.loads((tok_dir / "hf_tokenizer.json").read_text())
    assert not (tok_dir / "tokenizer.model").exists()
    assert record["files"]["tokenizer.json"] == __import__("hashlib").sha256(
        (tok_dir / "hf" / "tokenizer.json").read_bytes()).hexdigest()
    hf = AutoTokenizer.from_pretrained(str(workdir / BASE))
    pack = json.loads((track["arts"]["pack"] / "pack.json").read_text())
    assert pack["vocab_size"] == record["vocab_size"] == len(hf) == 1024
    assert pack["tokenizer_kind"] == "hf" and pack["target_ids"] == hf.encode("\nAnswer:", add_special_tokens=False)
    assert (pack["bos_id"], pack["eos_id"], pack["pad_id"]) == (1, 2, 0)  # <s>, </s>, <pad>
    # the adapter was evaluated: MARS vs ABLATED on its generations, its gates measured, verdicts given
    gen = track["arts"]["generate"]
    measured = json.loads((gen / "measurements.json").read_text())
    assert measured["model"] == "adapter" and len(measured["gates"]["per_layer"]) == 2
    assert set(measured["relief"]) == {"native", "adapter"}
    records = [json.loads(line) for line in (gen / "generations.jsonl").read_text().splitlines()]
    assert {r["arm"] for r in records} == {"mars", "ablated"}
    scores = json.loads((track["arts"]["score"] / "scores.json").read_text())
    verdicts = {h["id"]: h["verdict"] for h in scores["hypotheses"]}
    assert set(verdicts) == {"H1-selection", "H3-register-vs-ablated", "H5-conflict"}
    assert set(verdicts.values()) <= {"supported", "not supported", "inconclusive"}
    report = (track["arts"]["report"] / "report.md").read_text()
    assert "## Hypotheses (pre-registered)" in report and "## Evaluation: MARS vs ABLATED" in report
    assert "H1-selection" in report


def test_the_frozen_base_is_neither_trained_nor_counted(track, workdir, capsys) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from models.checkpoint import load_model

    folder = track["arts"]["train:adapter"]
    meta = json.loads((folder / "model.json").read_text())
    model = load_model(folder)
    base = AutoModelForCausalLM.from_pretrained(str(workdir / BASE), local_files_only=True)
    base_params = sum(p.numel() for p in base.parameters())
    assert meta["num_params"] == sum(p.numel() for p in model.parameters())  # the adapter's own: encoder + adapters
    assert not any(k.startswith("base") for k in model.state_dict()) and model.base_params() == base_params
    assert all(torch.equal(a, b) for a, b in zip(model.base.state_dict().values(), base.state_dict().values(),
                                                 strict=True))  # the trained adapter's base is the saved base
    assert model.alpha_l2() > 0  # the gates moved: the adapter trained
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(workdir)
        assert main(["models", "--profile", "adapter", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)["models"]}
    adapter = rows["adapter"]
    assert adapter["base_params"] == base_params and adapter["trainable"] == adapter["params"] == meta["num_params"]
    assert rows["native"]["trainable"] == rows["native"]["params"]


def test_hf_tokenizer_interface(workdir, tmp_path) -> None:
    from corpus.pack import encode_row
    from corpus.tokenizer import TokenizerError, load_tokenizer, save_hf_tokenizer

    save_hf_tokenizer(str(workdir / BASE), None, "\nAnswer:", tmp_path)
    tok = load_tokenizer(tmp_path)
    ids = tok.prompt_ids("Where is the key?")
    assert ids[0] == tok.bos_id and tuple(ids[-len(tok.target_ids):]) == tok.target_ids
    assert tok.decode(tok.encode("the key is under the mat.")) == "the key is under the mat."
    row, mask, cut = encode_row(tok, "Where is the key?", "under the mat", 64)
    assert row[-1] == tok.eos_id and sum(mask) == len(tok.encode("under the mat")) + 1 and not cut
    with pytest.raises(TokenizerError, match="separator"):  # a separator must be at least one token
        save_hf_tokenizer(str(workdir / BASE), None, "", tmp_path / "empty")


@pytest.mark.parametrize(("override", "message"), [
    (["tokenizer.base=google/gemma-2-2b"], "revision: the hub base 'google/gemma-2-2b' needs a pinned revision"),
    (["tokenizer.vocab_size=500"], "kind 'hf' uses the base's own vocabulary; remove vocab_size"),
    (["tokenizer.kind=sentencepiece"], "base are for kind 'hf'"),
    (["steering.enabled=true"], "steering.enabled: the steer readout reads a native's residual stream"),
])
def test_adapter_profile_validation(override: list[str], message: str) -> None:
    with pytest.raises(ProfileError, match=message.replace("(", r"\(")):
        load_profile("adapter", override)


def test_hub_base_with_pinned_revision_and_channel_less_eval_model() -> None:
    prof = load_profile("adapter", ["tokenizer.base=google/gemma-2-2b", f"tokenizer.revision={'a' * 40}"])
    assert prof.tokenizer.key()["revision"] == "a" * 40
    with pytest.raises(ProfileError, match="MARS vs ABLATED needs a native or an adapter"):
        load_profile("tiny", ["eval.model=baseline"])


def test_a_missing_local_base_is_refused_before_any_work(tmp_path, capsys) -> None:
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path)  # no ./bases/tiny-hf here
        assert main(["validate", "--profile", "adapter"]) != 0
    assert "'./bases/tiny-hf' does not exist" in capsys.readouterr().err


# ---- serve-model on the trained adapter -------------------------------------------------------------
# `tinymars serve-model` on the adapter track's adapter, through the real openai client.
#
# The adapter is the one `tinymars run --profile adapter --only train` trains on the tiny local Llama base that
# tests/test_adapter_track.py builds (its builder, imported). The engine traces the base's own (HF) tokenizer
# through the artifact store, takes the base from `base=` (--base: where the base lives now), decodes through the
# base's KV cache, reads numeric channel states, trains the adapter weights online while the frozen base stays
# bit-identical, and refuses steering and readouts with 400s naming the field. References are computed outside
# the server: models.generate without a KV cache (re-forwarding every token).
from tests.test_serve_model import _artifact, reference_continuation, serving  # noqa: E402

STATE = {"affect": {"valence": 0.8, "saliency": 0.6}, "time": {"hour": 23, "weekday": 5}}


@pytest.fixture(scope="module")
def adapter(track, workdir) -> dict:
    """The adapter the track's run trained (one adapter-profile run per module: the serving tests share it)."""
    return {"home": track["home"], "folder": _artifact(track["home"], "train", "adapter"), "base": workdir / BASE}


@pytest.fixture(scope="module")
def served(adapter):
    from app.serve_model import Settings, create_app
    from models.engine import Engine
    from models.online import OnlineTrainer, OptimizerSettings

    engine = Engine.load(adapter["folder"], base=adapter["base"])
    trainer = OnlineTrainer(engine, OptimizerSettings(lr=1e-2))
    with serving(create_app(engine, trainer, Settings(adapter["home"], "serve-adapter-test"))) as base:
        yield {"base": base, "engine": engine, "trainer": trainer}


def test_adapter_completion_with_a_channel_state_matches_the_reference(adapter, served, tmp_path):
    from openai import OpenAI

    from corpus.tokenizer import HFTokenizer
    from models.checkpoint import load_model
    from models.engine import EngineError, trace_model

    engine = served["engine"]
    assert isinstance(engine.tokenizer, HFTokenizer) and engine.source.tokenizer.name != "tokenizer.model"
    assert engine.source.base == adapter["base"].resolve() and engine.model.alpha_l2() > 0  # trained gates
    client = OpenAI(base_url=f"{served['base']}/v1", api_key="unused", max_retries=0, timeout=120)
    assert [m.id for m in client.models.list().data] == ["adapter"]
    prompt = "Tell me about your evening plans."
    out = client.completions.create(model="adapter", prompt=prompt, max_tokens=8, temperature=0,
                                    extra_body={"channels": STATE})
    local = {"model": load_model(adapter["folder"], base=adapter["base"]), "tok": engine.tokenizer,
             "source": engine.source}
    want = reference_continuation(local, engine.prompt_ids(prompt), STATE, 8, use_cache=False)
    assert out.choices[0].text == engine.tokenizer.decode(want) and out.usage.completion_tokens == len(want)
    chat = [{"role": "user", "content": "How was the trip?"}]
    plain = client.chat.completions.create(model="adapter", messages=chat, max_tokens=6, temperature=0,
                                           extra_body={"channels": STATE})
    chunks = list(client.chat.completions.create(model="adapter", messages=chat, max_tokens=6, temperature=0,
                                                 extra_body={"channels": STATE}, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == plain.choices[0].message.content
    # the state reaches the adapters: the same continuation scores differently with the state and ablated
    example = {"context": prompt, "continuation": "I will read by the window."}
    scored = httpx.post(f"{served['base']}/score", json={"examples": [{**example, "channels": STATE}, example]},
                        timeout=60).json()["losses"]
    assert abs(scored[0] - scored[1]) > 1e-6, scored
    # a base that is not where it is said to be: a clear error naming the flag, before anything loads
    with pytest.raises(EngineError, match="base: .*--base.* is not a folder; pass --base"):
        trace_model(adapter["folder"], base=tmp_path / "moved")


def test_adapter_refuses_steering_and_readouts(adapter, served):
    from models.engine import Engine, EngineError

    for extra, field in (({"readouts": True}, "readouts"), ({"steer": {"concept": "affect", "multiplier": 1}}, "steer"),
                         ({"channels": {"mood": 1}}, "channels.mood")):
        bad = httpx.post(f"{served['base']}/v1/completions", json={"prompt": "Hi", "max_tokens": 2, **extra})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == field, bad.text
    assert "adapter" in httpx.post(f"{served['base']}/v1/completions", json={"prompt": "Hi", "readouts": True}
                                   ).json()["error"]["message"]
    with pytest.raises(EngineError, match="readouts: arch 'adapter'"):
        Engine.load(adapter["folder"], base=adapter["base"], readouts=adapter["folder"])


def test_online_learning_trains_the_adapter_only(adapter, served):
    import torch

    from models.engine import trace_model

    engine = served["engine"]
    base_before = {k: v.clone() for k, v in engine.model.base.state_dict().items()}
    adapter_before = {k: v.clone() for k, v in engine.model.state_dict().items()}
    example = {"context": "Where is the key?", "continuation": "under the mat", "channels": STATE}
    before = httpx.post(f"{served['base']}/score", json={"examples": [example]}, timeout=60).json()["losses"][0]
    done = httpx.post(f"{served['base']}/train", json={"examples": [example], "steps": 5, "wait": True},
                      timeout=120).json()
    assert done["done"] and done["error"] is None and done["queued"] == 1
    after = httpx.post(f"{served['base']}/score", json={"examples": [example]}, timeout=60).json()["losses"][0]
    assert after < before - 0.05, (before, after)
    assert engine.version == 1
    assert all(torch.equal(v, engine.model.base.state_dict()[k]) for k, v in base_before.items())  # frozen
    trained = served["trainer"].model
    assert all(torch.equal(v, trained.base.state_dict()[k]) for k, v in base_before.items())
    assert not all(torch.equal(v, engine.model.state_dict()[k]) for k, v in adapter_before.items())
    assert trained.base is not engine.model.base  # training never runs through generation's base hooks
    ckpt = httpx.post(f"{served['base']}/checkpoint", timeout=120).json()
    meta = json.loads((Path(ckpt["path"]) / "model.json").read_text())
    assert meta["arch"] == "adapter" and meta["build"]["spec"]["base"] == str(adapter["base"].resolve())
    assert trace_model(ckpt["path"]).tokenizer == engine.source.tokenizer  # traced through the pack, as before
