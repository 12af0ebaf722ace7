"""The OpenAI-compatible HTTP face of a live model (models.engine) and its online trainer (models.online).

Endpoints: `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions` (both with `stream`),
and the extensions `POST /score`, `POST /train`, `GET /train/status`, `POST /checkpoint`. A request's
extension fields (`channels`, `steer`, `readouts`, `top_k`) come from the openai client's `extra_body`.

Batching: every generation request goes into one queue; a worker thread takes whatever is waiting (up to
`max_batch`) and decodes it as one KV-cached batch, handing each token to its request as it is picked
(streamed requests send it straight on). Invalid input is refused with HTTP 400 naming the field before it
reaches the queue, so a bad request never disturbs the batch another request is in.
"""

from __future__ import annotations

import asyncio
import json
import math
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from models.engine import Engine, GenerationRequest, RequestError, TokenEvent
from models.generate import Sampling
from models.online import OnlineTrainer, parse_examples

Sink = Callable[[TokenEvent | BaseException], None]


class Batcher:
    """One worker thread decoding queued requests in batches; events go to each request's sink."""

    def __init__(self, engine: Engine, max_batch: int = 8):
        self.engine = engine
        self.max_batch = max_batch
        self._queue: queue.Queue[tuple[GenerationRequest, Sink] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="generation-batcher", daemon=True)
        self._thread.start()

    def submit(self, request: GenerationRequest, sink: Sink) -> None:
        self._queue.put((request, sink))

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _work(self) -> None:
        while (first := self._queue.get()) is not None:
            batch = [first]
            while len(batch) < self.max_batch:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self._queue.put(None)
                    break
                batch.append(item)
            try:
                for event in self.engine.stream_batch([req for req, _ in batch]):
                    batch[event.row][1](event)
            except Exception as exc:  # the whole batch fails; every waiting request hears why
                for _, sink in batch:
                    sink(exc)


@dataclass
class Settings:
    """What the handlers need besides the engine: where checkpoints go and the lineage run they join."""

    home: Path
    run_id: str
    max_batch: int = 8


def error_response(field: str | None, message: str, status: int = 400, kind: str = "invalid_request_error"
                   ) -> JSONResponse:
    """The OpenAI error shape; `param` names the request field."""
    return JSONResponse({"error": {"message": message, "type": kind, "param": field, "code": None}},
                        status_code=status)


def create_app(engine: Engine, trainer: OnlineTrainer | None, settings: Settings) -> FastAPI:
    """The FastAPI app; the batcher starts with it and stops (with the trainer) when it shuts down."""
    model_id = engine.source.name
    batcher: Batcher | None = None

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        nonlocal batcher
        batcher = Batcher(engine, settings.max_batch)
        try:
            yield
        finally:
            batcher.close()
            if trainer is not None:
                trainer.close()
                if trainer.checkpoints:  # the server wrote into lineage: close its run
                    from tinymars.lineage import Lineage

                    Lineage(settings.home / "lineage.duckdb").finish_run(settings.run_id, "completed")

    app = FastAPI(title="tinymars serve-model", lifespan=lifespan)

    @app.exception_handler(RequestError)
    async def _bad_request(_req: Request, exc: RequestError) -> JSONResponse:
        return error_response(exc.field, str(exc))

    @app.exception_handler(ValueError)  # ChannelStateError and EngineError carry the field in the message
    async def _bad_value(_req: Request, exc: ValueError) -> JSONResponse:
        return error_response(getattr(exc, "field", None), str(exc))

    async def body_of(request: Request) -> dict[str, Any]:
        try:
            body = json.loads(await request.body() or b"{}")
        except (ValueError, UnicodeDecodeError) as exc:
            raise RequestError("body", f"not valid JSON ({exc})") from None
        if not isinstance(body, dict):
            raise RequestError("body", "expected a JSON object")
        return body

    def check_model(body: dict[str, Any]) -> None:
        name = body.get("model")
        known = {model_id, *( [engine.source.content_hash] if engine.source.content_hash else [])}
        if name is not None and name not in known and not (
                engine.source.content_hash and isinstance(name, str) and len(name) >= 6
                and engine.source.content_hash.startswith(name)):
            raise RequestError("model", f"{name!r} is not served here; this server serves {model_id!r}")

    def generation(body: dict[str, Any], prompt: str | list[int], default_max: int) -> GenerationRequest:
        if body.get("n", 1) != 1:
            raise RequestError("n", "only n=1 is supported; send the request again for another sample")
        if body.get("top_p") not in (None, 1, 1.0):
            raise RequestError("top_p", "nucleus sampling is not supported; use top_k (an extension field)")
        if body.get("stop") is not None:
            raise RequestError("stop", "stop sequences are not supported; generation ends at eos or max_tokens")
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        max_tokens = default_max if max_tokens is None else max_tokens
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise RequestError("max_tokens", f"must be an integer >= 1, got {max_tokens!r}")
        temperature = body.get("temperature", 1.0)
        if not isinstance(temperature, int | float) or isinstance(temperature, bool) or not (
                math.isfinite(temperature) and temperature >= 0):
            raise RequestError("temperature", f"must be a number >= 0, got {temperature!r}")
        top_k, seed = body.get("top_k"), body.get("seed", 0) or 0
        if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
            raise RequestError("top_k", f"must be an integer >= 1, got {top_k!r}")
        if not isinstance(seed, int):
            raise RequestError("seed", f"must be an integer, got {seed!r}")
        readouts = body.get("readouts", False)
        if not isinstance(readouts, bool):
            raise RequestError("readouts", f"must be true or false, got {readouts!r}")
        return engine.request(prompt, channels=engine.parse_channels(body.get("channels")),
                              max_new_tokens=max_tokens, sampling=Sampling(float(temperature), top_k, seed),
                              steer=engine.parse_steer(body.get("steer")), readouts=readouts)

    def events_of(req: GenerationRequest) -> AsyncIterator[TokenEvent]:
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue[TokenEvent | BaseException] = asyncio.Queue()
        batcher.submit(req, lambda ev: loop.call_soon_threadsafe(inbox.put_nowait, ev))

        async def drain() -> AsyncIterator[TokenEvent]:
            while True:
                ev = await inbox.get()
                if isinstance(ev, BaseException):
                    raise ev
                yield ev
                if ev.finish_reason is not None:
                    return

        return drain()

    def readout_block(pieces: list[str], scores: list[dict[str, float]]) -> dict[str, Any]:
        r = engine.readout
        return {"layer": r.layer, "concepts": list(r.concepts), "method": r.method,
                "tokens": [{"token": p, "scores": s} for p, s in zip(pieces, scores, strict=True)]}

    async def complete(req: GenerationRequest) -> dict[str, Any]:
        ids: list[int] = []
        scores: list[dict[str, float]] = []
        finish = "length"
        async for ev in events_of(req):
            if ev.token_id is not None:
                ids.append(ev.token_id)
                if ev.readout is not None:
                    scores.append(ev.readout)
            finish = ev.finish_reason or finish
        out = {"text": engine.tokenizer.decode(ids), "finish_reason": finish, "tokens": len(ids)}
        if req.readouts:
            out["readouts"] = readout_block([engine.tokenizer.decode([i]) for i in ids], scores)
        return out

    def usage(prompt: int, completion: int) -> dict[str, int]:
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def sse(obj: dict[str, Any] | str) -> str:
        return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"

    async def stream(req: GenerationRequest, chunk: Callable[[str, str | None, dict | None], dict[str, Any]],
                     first: dict[str, Any] | None) -> AsyncIterator[str]:
        if first is not None:
            yield sse(first)
        ids: list[int] = []
        sent = ""
        try:
            async for ev in events_of(req):
                if ev.token_id is not None:
                    ids.append(ev.token_id)
                text = engine.tokenizer.decode(ids)
                delta = text[len(sent):] if text.startswith(sent) else ""
                sent += delta
                if delta or ev.finish_reason is not None or ev.readout is not None:
                    readout = None if ev.readout is None else {
                        "token": engine.tokenizer.decode([ev.token_id]), "scores": ev.readout}
                    yield sse(chunk(delta, ev.finish_reason, readout))
        except Exception as exc:  # headers are gone: the error travels as the last event
            yield sse({"error": {"message": f"{type(exc).__name__}: {exc}", "type": "server_error"}})
        yield sse("[DONE]")

    # ---- endpoints ---------------------------------------------------------------------------------
    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": 0,
                                            "owned_by": "tinymars", "tinymars": engine.describe()}]}

    @app.post("/v1/completions", response_model=None)
    async def completions(request: Request) -> Any:
        body = await body_of(request)
        check_model(body)
        prompt = body.get("prompt")
        if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt)):
            prompts = [prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, str | list) for p in prompt):
            prompts = prompt
        else:
            raise RequestError("prompt", "expected a text, a list of texts or a list of token ids")
        reqs = [generation(body, p, 16) for p in prompts]
        cid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        base = {"id": cid, "object": "text_completion", "created": created, "model": model_id}
        if body.get("stream"):
            if len(reqs) != 1:
                raise RequestError("prompt", "streaming serves one prompt per request")

            def chunk(delta: str, finish: str | None, readout: dict | None) -> dict[str, Any]:
                choice = {"index": 0, "text": delta, "finish_reason": finish, "logprobs": None}
                return {**base, "choices": [{**choice, **({"readout": readout} if readout else {})}]}

            return StreamingResponse(stream(reqs[0], chunk, None), media_type="text/event-stream")
        outs = await asyncio.gather(*(complete(r) for r in reqs))
        choices = [{"index": i, "text": o["text"], "finish_reason": o["finish_reason"], "logprobs": None,
                    **({"readouts": o["readouts"]} if "readouts" in o else {})} for i, o in enumerate(outs)]
        return {**base, "choices": choices,
                "usage": usage(sum(len(r.prompt_ids) for r in reqs), sum(o["tokens"] for o in outs))}

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(request: Request) -> Any:
        body = await body_of(request)
        check_model(body)
        req = generation(body, engine.chat_text(body.get("messages")), 64)
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        base = {"id": cid, "created": created, "model": model_id}
        if body.get("stream"):
            def chunk(delta: str, finish: str | None, readout: dict | None) -> dict[str, Any]:
                choice = {"index": 0, "delta": {"content": delta} if delta else {}, "finish_reason": finish}
                return {**base, "object": "chat.completion.chunk",
                        "choices": [{**choice, **({"readout": readout} if readout else {})}]}

            first = {**base, "object": "chat.completion.chunk",
                     "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}
            return StreamingResponse(stream(req, chunk, first), media_type="text/event-stream")
        out = await complete(req)
        choice = {"index": 0, "message": {"role": "assistant", "content": out["text"]},
                  "finish_reason": out["finish_reason"], **({"readouts": out["readouts"]} if "readouts" in out else {})}
        return {**base, "object": "chat.completion", "choices": [choice],
                "usage": usage(len(req.prompt_ids), out["tokens"])}

    @app.post("/score")
    async def score(request: Request) -> dict[str, Any]:
        """Mean continuation loss (nats/token) of each example under the current weights."""
        body = await body_of(request)
        examples = parse_examples(engine, body.get("examples"))
        losses = await asyncio.to_thread(engine.continuation_losses, [(e.context, e.continuation) for e in examples],
                                         [e.channels for e in examples])
        return {"losses": losses, "weights_version": engine.version}

    def need_trainer() -> OnlineTrainer:
        if trainer is None:
            raise RequestError("train", "online learning is off on this server (started with --no-train)")
        return trainer

    @app.post("/train")
    async def train(request: Request) -> dict[str, Any]:
        """Queue examples for the training worker; `wait: true` answers once they are learned."""
        body = await body_of(request)
        online = need_trainer()
        unknown = sorted(set(body) - {"examples", "steps", "lr", "wait", "timeout"})
        if unknown:
            raise RequestError(unknown[0], "unknown field; allowed: examples, steps, lr, wait, timeout")
        steps, lr, timeout = body.get("steps", 1), body.get("lr"), body.get("timeout", 600)
        if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= 1000:
            raise RequestError("steps", f"must be an integer in 1..1000, got {steps!r}")
        if lr is not None and (not isinstance(lr, int | float) or not math.isfinite(lr) or lr <= 0):
            raise RequestError("lr", f"must be a number > 0, got {lr!r}")
        examples = parse_examples(engine, body.get("examples"))
        job, statuses = online.submit(examples, steps, None if lr is None else float(lr))
        if body.get("wait"):
            await asyncio.to_thread(job.done.wait, float(timeout))
        return {"examples": [{"id": e.id, "status": s} for e, s in zip(examples, statuses, strict=True)],
                "queued": statuses.count("queued"), "skipped": statuses.count("skipped"),
                "done": job.done.is_set(), "losses": list(job.losses), "error": job.error}

    @app.get("/train/status")
    async def train_status() -> dict[str, Any]:
        return need_trainer().status()

    @app.post("/checkpoint")
    async def checkpoint() -> dict[str, Any]:
        """Write the current weights (+ optimizer state, learned examples) as a model artifact in HOME."""
        return await asyncio.to_thread(need_trainer().checkpoint, settings.home, settings.run_id)

    return app
