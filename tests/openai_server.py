"""A real OpenAI-compatible HTTP server on 127.0.0.1 for the teacher tests and `bench/teacher.py`.

The openai client (>= 3) talks HTTPX2, which no httpx mock sees, so the tests run it end to end
against this server over real sockets. It speaks `POST /v1/chat/completions` with full usage fields
(`prompt_tokens_details.cached_tokens`, `completion_tokens_details.reasoning_tokens`, the latter
inside `completion_tokens`), and the Batch API (`POST /v1/files`, `POST /v1/batches`,
`GET /v1/batches/{id}`, `GET /v1/files/{id}/content`).

Answers are a pure function of the request: the server reads the rule lines the corpus prompt
templates carry ("Mention at least one of these words: ...", "Answer content: ...", the style
hint) and writes a target that passes pre-flight, so an interrupted run and an uninterrupted one
get identical answers. Faults are injected on request: a list consumed in arrival order (`faults`),
a deterministic per-request hook (`fault_fn`), and a rate (`fault_rate` of requests, drawn from
`fault_mix` by a hash of the key and its attempt number, so a load test is reproducible).
Outcomes: ok, 429 (with retry-after), 500, 503, timeout (sleeps past the client's timeout), drop
(closes the connection unanswered), malformed (cut JSON), html (a non-JSON 200), empty (no
choices), length (truncated), bad (an answer that breaks the rules, for pre-flight). A long-winded
model (`answer_tokens`) cuts every answer, online or in a batch, whose request allows fewer tokens.
Every request is logged with its key and outcome.

Run alone (for the benchmarks): `python tests/openai_server.py --latency 0.1` prints its base URL; the key
it wants comes from $FAKE_OPENAI_KEY and `GET /v1/_stats` returns its counts.
"""

from __future__ import annotations

import argparse
import email.parser
import hashlib
import json
import math
import os
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

OUTCOMES = ("ok", "429", "500", "503", "timeout", "drop", "malformed", "html", "empty", "length", "bad")


def request_key(body: dict[str, Any]) -> str:
    """The server's own identity of a call (what the client must never pay for twice)."""
    ident = {k: body.get(k) for k in ("model", "messages", "temperature", "max_tokens", "seed")}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def write_target(user_text: str, bad: bool = False) -> str:
    """A target that follows the rule lines of a corpus prompt (or, when `bad`, one that breaks them)."""
    mention = re.search(r"^Mention at least one of these words: (.+?)\.?$", user_text, re.M)
    if mention:
        key = mention.group(1).split(", ")[0]
        if bad:
            avoid = re.search(r"^Do not use any of these words: (.+?)\.?$", user_text, re.M)
            other = avoid.group(1).split(", ")[0] if avoid else key
            return f"{key} or {other}, either would do."
        return f"{key} first: let us build on {key} today."
    core = re.search(r"^Answer content: (.+)$", user_text, re.M)
    hint = re.search(r'open like "(.+?)" and close like "(.+?)"\.?$', user_text, re.M)
    if core and hint:
        return core.group(1) if bad else f"{hint.group(1)} {core.group(1)} {hint.group(2)}"
    return "I am not sure what to write here."


def token_limit(body: dict[str, Any]) -> int:
    """The completion-token limit a chat request asks for (the openai default when it asks none)."""
    return int(body.get("max_completion_tokens") or body.get("max_tokens") or 4096)


SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
SCENARIO_FRAMES = {  # pool -> fields from two made-up words {a} {b}; keys are [a, b] where the pool has keys
    "memories": {"text": "keeps the {a} {b} in the shed", "idea": "take the {a} {b} out for an afternoon",
                 "why": "The {a} {b} always clears your head."},
    "threads": {"text": "sorting out the {a} {b} plan", "topic": "the {a} {b} plan",
                "step": "Is the {a} ready for the {b}?"},
    "crafts": {"role": "a {a} keeper", "activity": "tends the {a} {b} every week", "lens": "tend the {a} {b}"},
    "identity_questions": {"question": "How do I get the {a} {b} sorted?",
                           "answer": "list the {a} parts first and sort the {b} after"},
    "neutral_prompts": {"question": "What goes on the {a} list?",
                        "core": "The {a} list has the {b} form and two copies."},
    "ethics_prompts": {"question": "Can I move the {a} {b} myself?",
                       "core": "You can move the {a} {b} with the trolley."},
}


def made_up_word(number: int) -> str:
    """A distinct non-English word per number ("zu" + four syllables): no lexicon, name or other key has it."""
    digits = [(number // len(SYLLABLES) ** k) % len(SYLLABLES) for k in range(4)]
    return "zu" + "".join(SYLLABLES[d] for d in digits)


def scenario_words(pool: str, batch: int, entry: int) -> tuple[str, str]:
    """The two made-up words of one entity the server writes: distinct across pools, batches and entries."""
    number = (list(SCENARIO_FRAMES).index(pool) * 10_000 + batch) * 64 + entry
    return made_up_word(2 * number), made_up_word(2 * number + 1)


def write_scenario(user_text: str, bad: bool = False) -> dict[str, Any] | None:
    """The answer to a scenario request ("Pool:", "Entries:", "Batch:" lines; None for any other request): made-up,
    distinct entities of the pool. `bad` plants three invalid ones after the first: an exact duplicate, one with a
    field missing, and one using a register lexicon word as a key ("morning") or in its answer core (an identity
    question: an answer far too long)."""
    pool = re.search(r"^Pool: (\w+)$", user_text, re.M)
    count = re.search(r"^Entries: (\d+)$", user_text, re.M)
    number = re.search(r"^Batch: (\d+)$", user_text, re.M)
    if not (pool and count and number) or pool.group(1) not in SCENARIO_FRAMES:
        return None
    frames = SCENARIO_FRAMES[pool.group(1)]
    theme = re.search(r"^Theme: (.+)$", user_text, re.M)
    entities = []
    for i in range(int(count.group(1))):
        a, b = scenario_words(pool.group(1), int(number.group(1)), i)
        entity: dict[str, Any] = {f: text.format(a=a, b=b) for f, text in frames.items()}
        if "text" in frames or "activity" in frames:
            entity["keys"] = [a, b]
        if pool.group(1) == "ethics_prompts":
            entity["category"] = theme.group(1).strip() if theme else "physical_safety"
        entities.append(entity)
    if bad and len(entities) >= 4:
        entities[1] = dict(entities[0])
        entities[2] = {k: v for k, v in entities[2].items() if k != next(iter(frames))}
        if "keys" in entities[3]:
            entities[3]["keys"] = ["morning", entities[3]["keys"][1]]
        elif "core" in entities[3]:
            entities[3]["core"] = "Good morning, be careful: " + entities[3]["core"]
        else:  # identity questions: an answer far too long
            entities[3]["answer"] = " and ".join([entities[3]["answer"]] * 8)
    return {"entities": entities}


def _tokens(text: str) -> int:
    return math.ceil(len(text) / 4)


class FakeOpenAI:
    """The server (a ThreadingHTTPServer on an ephemeral port); use as a context manager."""

    def __init__(
        self,
        latency_s: float = 0.0,
        api_key: str | None = None,
        faults: Iterable[str] = (),
        fault_fn: Callable[[str, dict[str, Any]], str | None] | None = None,
        retry_after_ms: int = 20,
        timeout_sleep_s: float = 1.0,
        json_schema: bool = True,
        reasoning_tokens: int = 3,
        batch_polls: int = 1,
        batch_item_faults: int = 0,
        refuse: Iterable[str] = (),
        fault_rate: float = 0.0,
        fault_mix: Iterable[str] = ("429", "500", "timeout", "malformed"),
        answer_tokens: int | None = None,
    ):
        self.latency_s, self.api_key = latency_s, api_key
        self.faults = list(faults)
        self.fault_fn = fault_fn
        self.retry_after_ms, self.timeout_sleep_s = retry_after_ms, timeout_sleep_s
        self.json_schema, self.reasoning_tokens = json_schema, reasoning_tokens
        self.batch_polls, self.batch_item_faults = batch_polls, batch_item_faults
        self.refuse = set(refuse)  # body parameters answered with a 400, as newer OpenAI models do
        self.fault_rate, self.fault_mix = fault_rate, tuple(fault_mix)
        # a long-winded model: every answer needs this many completion tokens, so a request allowing fewer
        # (max_tokens / max_completion_tokens) is cut there: finish_reason "length", every allowed token billed
        self.answer_tokens = answer_tokens
        self.attempts: Counter[str] = Counter()  # chat requests seen per key
        self.hold_batches = threading.Event()  # set: batches stay in progress
        self.lock = threading.Lock()
        self.log: list[dict[str, Any]] = []  # one entry per chat request: key, outcome, time
        self.outcomes: Counter[str] = Counter()
        self.usage_sent: list[dict[str, Any]] = []  # usage of every billed answer (ok, length, bad)
        self.files: dict[str, bytes] = {}
        self.batches: dict[str, dict[str, Any]] = {}
        self.batch_outcomes: Counter[str] = Counter()
        self._systems_seen: set[str] = set()
        self.in_flight = self.max_in_flight = 0
        self._stopping = threading.Event()
        self._httpd: ThreadingHTTPServer | None = None

    # ------------------------------------------------------------ lifecycle
    def start(self) -> str:
        server = self

        class Handler(_Handler):
            fake = server

        httpd = _Server(("127.0.0.1", 0), Handler)
        self._httpd = httpd
        threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self.base_url

    @property
    def base_url(self) -> str:
        assert self._httpd is not None
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def stop(self) -> None:
        self._stopping.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> FakeOpenAI:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------ observations
    def answered(self) -> Counter[str]:
        """Billed answers per request key (a key above 1 is a repeated paid call)."""
        return Counter(e["key"] for e in self.log if e["outcome"] in ("ok", "bad"))

    def requests_for(self, key: str) -> list[dict[str, Any]]:
        return [e for e in self.log if e["key"] == key]

    # ------------------------------------------------------------ chat completions
    def decide(self, key: str, body: dict[str, Any]) -> str:
        with self.lock:
            outcome = self.faults.pop(0) if self.faults else None
            self.attempts[key] += 1
            attempt = self.attempts[key]
        if outcome is None and self.fault_fn is not None:
            outcome = self.fault_fn(key, body)
        if outcome is None and self.fault_rate:
            draw = int(hashlib.sha256(f"{key}:{attempt}".encode()).hexdigest()[:12], 16) / 16**12
            if draw < self.fault_rate:
                outcome = self.fault_mix[int(draw / self.fault_rate * len(self.fault_mix))]
        if outcome is None and self.cuts(body):
            outcome = "length"
        return outcome or "ok"

    def cuts(self, body: dict[str, Any]) -> bool:
        """Whether the long-winded model (`answer_tokens`) runs past this request's token limit."""
        return self.answer_tokens is not None and token_limit(body) < self.answer_tokens

    def completion(self, body: dict[str, Any], outcome: str) -> dict[str, Any]:
        messages = body.get("messages") or []
        user = next((m["content"] for m in reversed(messages) if m.get("role") == "user"), "")
        system = next((m["content"] for m in messages if m.get("role") == "system"), "")
        target = write_target(user, bad=outcome == "bad")
        payload = write_scenario(user, bad=outcome == "bad") or {"target": target}
        fmt = (body.get("response_format") or {}).get("type")
        if fmt in ("json_schema", "json_object"):
            content = json.dumps(payload)
        else:  # no structured output: the way chatty models answer
            content = "Sure! Here it is:\n```json\n" + json.dumps(payload) + "\n```"
        finish = "stop"
        if outcome == "length":
            content, finish = content[: len(content) // 2], "length"
        prompt_tokens = sum(_tokens(m.get("content", "")) + 3 for m in messages)
        with self.lock:
            cached = _tokens(system) if system in self._systems_seen else 0
            self._systems_seen.add(system)
        completion_tokens = _tokens(content) + self.reasoning_tokens
        if outcome == "length" and self.cuts(body):
            completion_tokens = token_limit(body)
        usage = {
            "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached},
            "completion_tokens_details": {"reasoning_tokens": self.reasoning_tokens},
        }
        with self.lock:
            self.usage_sent.append(usage)
        return {
            "id": f"chatcmpl-{request_key(body)[:12]}", "object": "chat.completion", "created": int(time.time()),
            "model": body.get("model", "fake"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish}],
            "usage": usage,
        }

    # ------------------------------------------------------------ batch
    def run_batch(self, batch: dict[str, Any]) -> None:
        lines = self.files[batch["input_file_id"]].decode().splitlines()
        out, failed = [], 0
        for line in lines:
            req = json.loads(line)
            with self.lock:
                fault = self.batch_item_faults > 0
                self.batch_item_faults -= fault
            if fault:
                failed += 1
                self.batch_outcomes["500"] += 1
                response = {"status_code": 500, "body": {"error": {"message": "internal error"}}}
            else:
                cut = "length" if self.cuts(req["body"]) else "ok"
                self.batch_outcomes[cut] += 1
                response = {"status_code": 200, "body": self.completion(req["body"], cut)}
            out.append(json.dumps({"id": f"batch_req_{len(out)}", "custom_id": req["custom_id"],
                                   "response": response, "error": None}))
        file_id = f"file-out-{batch['id']}"
        self.files[file_id] = ("\n".join(out) + "\n").encode()
        batch.update(status="completed", output_file_id=file_id,
                     request_counts={"total": len(lines), "completed": len(lines) - failed, "failed": failed})


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # the listen backlog: must be set before the socket listens

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client killed mid-request (the SIGKILL test) is expected, not an error worth a traceback."""
        import sys

        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in two writes: no 40 ms delayed-ACK stall
    fake: FakeOpenAI

    def log_message(self, *args: Any) -> None:  # quiet
        pass

    def _send(self, status: int, payload: Any, headers: dict[str, str] | None = None,
              content_type: str = "application/json") -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _authorised(self) -> bool:
        fake = self.fake
        given = (self.headers.get("Authorization") or "").removeprefix("Bearer ")
        if fake.api_key is None or given == fake.api_key:
            return True
        with fake.lock:
            fake.outcomes["401"] += 1
        # like some real providers, echo the key it was given: the client must redact it
        self._send(401, {"error": {"message": f"Incorrect API key provided: {given}.", "type": "invalid_request_error",
                                   "code": "invalid_api_key"}})
        return False

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        raw = self._body()
        if not self._authorised():
            return
        if self.path.endswith("/chat/completions"):
            self._chat(json.loads(raw))
        elif self.path.endswith("/files"):
            self._upload(raw)
        elif self.path.endswith("/batches"):
            self._create_batch(json.loads(raw))
        else:
            self._send(404, {"error": {"message": f"no route {self.path}"}})

    def do_GET(self) -> None:  # noqa: N802
        fake = self.fake
        if self.path.endswith("/_stats"):  # the server's own counts, for a client in another process
            with fake.lock:
                self._send(200, {"outcomes": dict(fake.outcomes), "answered": dict(fake.answered()),
                                 "requests": len(fake.log)})
            return
        if not self._authorised():
            return
        m = re.search(r"/batches/([^/]+)$", self.path)
        if m and m.group(1) in fake.batches:
            batch = fake.batches[m.group(1)]
            batch["polls"] += 1
            if batch["status"] != "completed" and batch["polls"] >= fake.batch_polls and not fake.hold_batches.is_set():
                fake.run_batch(batch)
            self._send(200, {k: v for k, v in batch.items() if k != "polls"})
            return
        m = re.search(r"/files/([^/]+)/content$", self.path)
        if m and m.group(1) in fake.files:
            self._send(200, fake.files[m.group(1)], content_type="application/octet-stream")
            return
        self._send(404, {"error": {"message": f"no route {self.path}"}})

    def _chat(self, body: dict[str, Any]) -> None:
        fake = self.fake
        key = request_key(body)
        refused = sorted(fake.refuse & set(body))
        if refused:
            with fake.lock:
                fake.outcomes["400"] += 1
                fake.log.append({"key": key, "outcome": "400", "t": time.monotonic()})
            hint = " Use 'max_completion_tokens' instead." if refused[0] == "max_tokens" else ""
            self._send(400, {"error": {"message": f"Unsupported parameter: '{refused[0]}' is not supported with "
                                                  f"this model.{hint}", "type": "invalid_request_error"}})
            return
        fmt = (body.get("response_format") or {}).get("type")
        if fmt == "json_schema" and not fake.json_schema:
            with fake.lock:
                fake.outcomes["400"] += 1
                fake.log.append({"key": key, "outcome": "400", "t": time.monotonic()})
            self._send(400, {"error": {"message": "response_format json_schema is not supported",
                                       "type": "invalid_request_error"}})
            return
        outcome = fake.decide(key, body)
        with fake.lock:
            fake.outcomes[outcome] += 1
            fake.log.append({"key": key, "outcome": outcome, "t": time.monotonic()})
            fake.in_flight += 1
            fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
        try:
            self._answer(body, outcome)
        finally:
            with fake.lock:
                fake.in_flight -= 1

    def _answer(self, body: dict[str, Any], outcome: str) -> None:
        fake = self.fake
        if fake.latency_s:
            time.sleep(fake.latency_s)
        if outcome in ("ok", "bad", "length"):
            self._send(200, fake.completion(body, outcome))
        elif outcome == "429":
            self._send(429, {"error": {"message": "Rate limit reached", "type": "rate_limit_error"}},
                       {"retry-after-ms": str(fake.retry_after_ms), "retry-after": "1"})
        elif outcome in ("500", "503"):
            self._send(int(outcome), {"error": {"message": "The server had an error", "type": "server_error"}})
        elif outcome == "timeout":
            fake._stopping.wait(fake.timeout_sleep_s)
            self._send(200, {"late": True})  # the client gave up long ago
        elif outcome == "drop":
            self.close_connection = True  # nothing written: the client sees the connection close
        elif outcome == "malformed":
            self._send(200, b'{"id": "chatcmpl-x", "choices": [{"index": 0, "message": {"content": "cut')
        elif outcome == "html":
            self._send(200, b"<html><body>502 Bad Gateway</body></html>", content_type="text/html")
        elif outcome == "empty":
            self._send(200, {"id": "chatcmpl-x", "object": "chat.completion", "created": 0, "model": "fake",
                             "choices": []})
        else:
            raise ValueError(f"unknown outcome {outcome!r}")

    def _upload(self, raw: bytes) -> None:
        fake = self.fake
        msg = email.parser.BytesParser().parsebytes(
            b"Content-Type: " + self.headers["Content-Type"].encode() + b"\r\n\r\n" + raw)
        data, name = b"", "upload.jsonl"
        for part in msg.walk():
            if part.get_param("name", header="content-disposition") == "file":
                data = part.get_payload(decode=True) or b""
                name = part.get_filename() or name
        with fake.lock:
            file_id = f"file-{len(fake.files) + 1}"
            fake.files[file_id] = data
        self._send(200, {"id": file_id, "object": "file", "bytes": len(data), "created_at": int(time.time()),
                         "filename": name, "purpose": "batch", "status": "processed"})

    def _create_batch(self, body: dict[str, Any]) -> None:
        fake = self.fake
        with fake.lock:
            batch_id = f"batch_{len(fake.batches) + 1}"
            fake.batches[batch_id] = {
                "id": batch_id, "object": "batch", "endpoint": body["endpoint"], "input_file_id": body["input_file_id"],
                "completion_window": body["completion_window"], "status": "in_progress",
                "created_at": int(time.time()), "output_file_id": None, "error_file_id": None, "polls": 0,
                "request_counts": {"total": 0, "completed": 0, "failed": 0},
            }
        self._send(200, {k: v for k, v in fake.batches[batch_id].items() if k != "polls"})


def main() -> None:
    parser = argparse.ArgumentParser(description="a fake OpenAI-compatible server on 127.0.0.1 (for benchmarks)")
    parser.add_argument("--latency", type=float, default=0.1, help="seconds each chat answer takes")
    parser.add_argument("--fault-rate", type=float, default=0.0, help="share of chat requests given a fault")
    parser.add_argument("--timeout-sleep", type=float, default=1.0, help="how long a 'timeout' fault hangs")
    args = parser.parse_args()
    api_key = os.environ.get("FAKE_OPENAI_KEY")  # never on the command line (ps shows it)
    with FakeOpenAI(latency_s=args.latency, api_key=api_key, fault_rate=args.fault_rate,
                    timeout_sleep_s=args.timeout_sleep) as fake:
        print(fake.base_url, flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
