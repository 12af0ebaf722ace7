"""The teacher client for any OpenAI-compatible endpoint (OpenAI, vLLM, Ollama, llama.cpp, hosted).

`TeacherClient.answer_all(requests)` answers a list of chat requests with bounded concurrency, a
requests/tokens-per-minute limiter and a money budget, and never pays twice for one call: each
request is looked up in the call cache first, and an answer is stored there before it is used.

Every HTTP attempt is one lineage record (status, attempt number, tokens, price, latency) written to
the cache's journal as soon as it ends, so a killed run's paid calls are still accounted. Faults and
what happens to them:
- 429, 408, 409, 5xx: retried with exponential backoff; a `retry-after(-ms)` header is honoured (a wait
  longer than `max_retry_after_s` stops the run: rerun later, nothing answered is lost);
- timeouts, dropped connections, a malformed or non-JSON body, empty choices, empty content: retried;
- `finish_reason=length` (truncated, and paid for) is not transient: retried once, at once (with
  `truncation_max_tokens` when the profile sets it), then the request comes back truncated (its rows
  are rejected, never cached). Once enough calls have answered, a truncated share above
  `max_truncation_rate` stops the run (`TruncationStop`, naming the max_tokens to raise);
- `finish_reason=content_filter`: an answer (cached), which pre-flight rejects;
- 401/403/404 and other 4xx: fatal at once (a bad key, model or parameter will not heal by retrying),
  except a 400 naming a parameter the server does not take: `max_tokens` becomes `max_completion_tokens`,
  `temperature` is dropped, or (mode `auto`) `response_format` is dropped, and the call is retried;
  without structured output the answer is parsed tolerantly (`parse_target`).
The openai client's own retries are off (max_retries=0), so every attempt is ours to count and price.
The key never appears in a record, a log line or an exception: error text is redacted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from corpus.call_cache import CallCache
from corpus.teacher_limits import (
    TRUNCATED_ATTEMPTS,
    Budget,
    BudgetStop,
    RateLimiter,
    TruncationGuard,
    backoff_delay,
    retry_after_s,
)
from tinymars.prices import Price

TARGET_SCHEMA = {
    "name": "corpus_target",
    "strict": True,
    "schema": {
        "type": "object",
        "properties": {"target": {"type": "string"}},
        "required": ["target"],
        "additionalProperties": False,
    },
}
RESPONSE_FORMATS = {
    "json_schema": {"type": "json_schema", "json_schema": TARGET_SCHEMA},
    "json_object": {"type": "json_object"},
}
FATAL_STATUS = {401: "auth_error", 403: "auth_error", 404: "not_found"}
ANSWERED = ("ok", "content_filter")  # statuses whose answer is stored in the cache
ERROR_CHARS = 300
LEASE_POLL_S = 0.05  # how often a run waiting on another run's call looks for its answer
_KEY_LIKE = re.compile(r"\b(sk|pk|rk)-[A-Za-z0-9_\-*]{6,}")


@dataclass(frozen=True)
class TeacherRequest:
    """One call: its cache key, the capability it serves (for the audit) and what is sent."""

    key: str
    capability: str
    messages: list[dict[str, str]]
    seed: int | None
    prompt_tokens_est: int


@dataclass(frozen=True)
class TeacherAnswer:
    content: str
    finish_reason: str
    cache_hit: bool = False
    usage: dict[str, Any] = field(default_factory=dict)

    @property
    def truncated(self) -> bool:
        return self.finish_reason == "length"


class TeacherError(RuntimeError):
    """Generation stopped. `teacher_calls` holds the lineage records of every call made so far, so the
    flow records them on the failed stage; everything answered stays in the call cache. `final`: an
    immediate retry cannot help (a budget, a rejected key), so the stage should not retry."""

    final = False

    def __init__(self, message: str, teacher_calls: list[dict[str, Any]] | None = None, final: bool | None = None):
        super().__init__(message)
        self.teacher_calls = teacher_calls or []
        if final is not None:
            self.final = final


class BudgetExceeded(TeacherError):
    final = True


class TeacherUnavailable(TeacherError):
    pass


class TruncationStop(TeacherError):
    """Too many answers cut at max_tokens: rerunning at the same max_tokens would pay for the same cuts."""

    final = True


class MissingKey(ValueError):
    """The environment variable the profile names holds no key."""


def api_key_from_env(teacher: Any) -> str | None:
    """The key, from the environment variable the profile names (a profile never holds the key itself)."""
    name = getattr(teacher, "api_key_env", None)
    if not name:
        return None
    value = os.environ.get(name, "").strip()
    if value or teacher.free:
        return value or None
    raise MissingKey(
        f"corpus.teacher.api_key_env: the environment variable {name} is not set; export {name} with the key for "
        f"{public_endpoint(teacher.base_url)} (the key is only ever read from there)"
    )


def estimate_prompt_tokens(messages: list[dict[str, str]]) -> int:
    """An upper bound on prompt tokens for ordinary text: 1 token per 3 UTF-8 bytes, plus framing.

    Real tokenizers average about 4 bytes per token on English; the slack keeps the budget's worst
    case a worst case. The client also scales it up if a server ever reports more.
    """
    body = sum(len(m.get("content", "").encode("utf-8")) for m in messages)
    return math.ceil(body / 3) + 8 * len(messages) + 16


def redact(text: str, secrets: tuple[str, ...]) -> str:
    """Error text with every secret and anything shaped like an API key removed."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "[redacted]")
    return _KEY_LIKE.sub("[redacted]", text)


def public_endpoint(base_url: str) -> str:
    """The base URL without user info, query or fragment (a key can hide in any of them)."""
    parts = urlsplit(base_url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def parse_usage(usage: dict[str, Any] | None) -> dict[str, int]:
    """prompt/completion/cached/reasoning tokens; reasoning is already inside completion (not added)."""
    usage = usage or {}
    details_in = usage.get("prompt_tokens_details") or {}
    details_out = usage.get("completion_tokens_details") or {}
    return {
        "prompt_tokens": int(usage.get("prompt_tokens") or 0),
        "completion_tokens": int(usage.get("completion_tokens") or 0),
        "cached_tokens": int(details_in.get("cached_tokens") or 0),
        "reasoning_tokens": int(details_out.get("reasoning_tokens") or 0),
    }


class AttemptFailed(Exception):
    """One failed attempt: its lineage status, the wait the server asked for, and whether it was paid."""

    def __init__(self, status: str, error: str, retry_after: float | None = None, usage: dict | None = None,
                 fatal: bool = False, content: str = ""):
        super().__init__(error)
        self.status, self.error, self.retry_after, self.usage, self.fatal = status, error, retry_after, usage, fatal
        self.content = content
        self.cost = 0.0  # what the attempt was billed (set once priced)


class _Stopped(Exception):
    """Another request stopped the run; this one is not sent."""


class TeacherClient:
    """Answers chat requests through one endpoint, with the cache, the budget and the limiter."""

    def __init__(
        self,
        settings: Any,
        api_key: str | None,
        cache: CallCache,
        price: Price,
        budget: Budget | None = None,
        invocation: str | None = None,
        log: Callable[[str], None] = lambda _: None,
        sleep: Callable[[float], Any] = asyncio.sleep,
        gate: Callable[[], Any] | None = None,
    ):
        from openai import AsyncOpenAI

        self.s = settings
        self.model = settings.model
        self.endpoint = public_endpoint(settings.base_url)
        self.cache, self.price = cache, price
        self.budget = budget if budget is not None else Budget(getattr(settings, "max_usd", None))
        self.invocation = invocation or cache.start_invocation()
        self.log, self.sleep = log, sleep
        # an extra async context around each HTTP attempt: the orchestrator's cross-process limit
        # (a Prefect global concurrency limit), on top of this client's own limiter
        self.gate = gate or contextlib.nullcontext
        self.secrets = (api_key,) if api_key else ()
        # a local server needs no key, but the client must never fall back to $OPENAI_API_KEY on its own
        self.api = AsyncOpenAI(base_url=settings.base_url, api_key=api_key or "no-key", max_retries=0,
                               timeout=settings.timeout_s)
        self.limiter = RateLimiter(settings.requests_per_minute, settings.tokens_per_minute)
        self.structured = settings.structured_output
        # adapted on the fly when a server refuses a parameter (newer OpenAI models: max_completion_tokens,
        # default temperature only); the call key keeps the profile's values
        self.token_param = "max_tokens"
        self.send_temperature = True
        self.records: list[dict[str, Any]] = []
        self.counts = {"requests": 0, "answered": 0, "cache_hits": 0, "retries": 0}
        self._estimate_scale = 1.0
        self.jitter = random.Random()
        self.retry_max_tokens = getattr(settings, "truncation_max_tokens", None) or settings.max_tokens
        self.truncation = TruncationGuard(getattr(settings, "max_truncation_rate", 1.0), settings.max_tokens,
                                          getattr(settings, "truncation_max_tokens", None))
        self._stop: TeacherError | None = None

    async def close(self) -> None:
        await self.api.close()

    # ------------------------------------------------------------ requests
    @property
    def params(self) -> dict[str, Any]:
        """The sampling parameters (part of every call key)."""
        return {"temperature": self.s.temperature, "max_tokens": self.s.max_tokens}

    def worst_case_usd(self, req: TeacherRequest, batch: bool = False, max_tokens: int | None = None) -> float:
        return self.price.worst_case(math.ceil(req.prompt_tokens_est * self._estimate_scale),
                                     max_tokens or self.s.max_tokens, batch)

    def body(self, req: TeacherRequest, max_tokens: int | None = None) -> dict[str, Any]:
        """The /v1/chat/completions body for a request (as sent now: structured output may be off; a truncation
        retry may ask for more tokens than the profile's max_tokens, under the same call key)."""
        body: dict[str, Any] = {"model": self.model, "messages": req.messages,
                                self.token_param: max_tokens or self.s.max_tokens}
        if self.send_temperature:
            body["temperature"] = self.s.temperature
        if req.seed is not None:
            body["seed"] = req.seed
        fmt = "json_schema" if self.structured == "auto" else self.structured
        if fmt in RESPONSE_FORMATS:
            body["response_format"] = RESPONSE_FORMATS[fmt]
        return body

    def record(self, req: TeacherRequest, status: str, attempt: int, latency_s: float | None = None,
               usage: dict[str, Any] | None = None, price_usd: float = 0.0, error: str | None = None,
               cache_hit: bool = False, journal: bool = True) -> dict[str, Any]:
        """One lineage row (tinymars.lineage `teacher_calls` columns, less run_id and created_at)."""
        tokens = parse_usage(usage) if usage and not cache_hit else dict.fromkeys(
            ("prompt_tokens", "completion_tokens", "cached_tokens", "reasoning_tokens"), 0)
        rec = {"call_key": req.key, "capability": req.capability, "model": self.model, "endpoint": self.endpoint,
               **tokens, "price_usd": price_usd, "latency_s": None if latency_s is None else round(latency_s, 4),
               "status": status, "attempt": attempt, "cache_hit": cache_hit,
               "error": None if error is None else redact(error, self.secrets)[:ERROR_CHARS]}
        self.records.append(rec)
        if journal and not cache_hit:
            self.cache.journal(self.invocation, rec)
        return rec

    # ------------------------------------------------------------ answering
    def cached(self, req: TeacherRequest) -> TeacherAnswer | None:
        hit = self.cache.get(req.key)
        if hit is None:
            return None
        self.counts["cache_hits"] += 1
        self.record(req, "ok", 0, 0.0, cache_hit=True)
        return TeacherAnswer(hit["content"], hit["finish_reason"], True, hit.get("usage") or {})

    async def answer_all(
        self, requests: list[TeacherRequest], progress: Callable[[dict[str, Any]], None] | None = None
    ) -> dict[str, TeacherAnswer]:
        """Answers by key, from the cache or the endpoint. Raises BudgetExceeded / TeacherUnavailable after
        letting the calls in flight finish (their answers are stored), so a rerun repeats nothing."""
        answers: dict[str, TeacherAnswer] = {}
        todo: list[TeacherRequest] = []
        for req in dict((r.key, r) for r in requests).values():
            hit = self.cached(req)
            if hit is not None:
                answers[req.key] = hit
            else:
                todo.append(req)
        gate = asyncio.Semaphore(self.s.max_concurrency)

        async def one(req: TeacherRequest) -> None:
            async with gate:
                if self._stop is not None:
                    return
                try:
                    answers[req.key] = answer = await self.answer(req)
                except TeacherError as exc:
                    self._stop = self._stop or exc
                except _Stopped:
                    return
                else:
                    self.watch_truncation(answer)
                if progress is not None:
                    progress(self.snapshot(len(requests), len(answers)))

        await asyncio.gather(*(one(r) for r in todo))
        if self._stop is not None:
            stop, self._stop = self._stop, None
            stop.teacher_calls = list(self.records)
            raise stop
        return answers

    def watch_truncation(self, answer: TeacherAnswer) -> None:
        """Count a final answer from the endpoint; too many truncated stops the run (calls in flight finish)."""
        if answer.cache_hit:
            return
        self.truncation.observe(answer.truncated)
        if self._stop is None and self.truncation.tripped():
            self._stop = TruncationStop(self.truncation.message())

    def snapshot(self, total: int, done: int) -> dict[str, Any]:
        return {"total": total, "done": done, "spent_usd": self.budget.spent_now, **self.counts}

    async def answer(self, req: TeacherRequest) -> TeacherAnswer:
        """One request: the stored answer, or (holding the call's lease, so a second run sharing the call
        cache waits instead of paying again) through the endpoint with retries."""
        stored = await self._claim(req)
        if stored is not None:
            return stored
        try:
            return await self._send(req)
        finally:
            self.cache.unlease(req.key, self.invocation)  # a no-op once the answer is stored

    def lease_ttl_s(self) -> float:
        """The longest a live run can spend on one call (every attempt timing out after its longest wait):
        a lease older than this is stale, whoever holds it."""
        wait = max(self.s.backoff_max_s, self.s.max_retry_after_s)
        return (self.s.max_retries + TRUNCATED_ATTEMPTS) * (self.s.timeout_s + wait) + 60.0

    async def _claim(self, req: TeacherRequest) -> TeacherAnswer | None:
        """Wait while another live run sends this call; its answer is then a cache hit. None: ours to send."""
        while True:
            state, stored = self.cache.claim(req.key, self.invocation, self.lease_ttl_s())
            if state == "claimed":
                return None
            if state == "answer" and stored is not None:
                self.counts["cache_hits"] += 1
                self.record(req, "ok", 0, 0.0, cache_hit=True)
                return TeacherAnswer(stored["content"], stored["finish_reason"], True, stored.get("usage") or {})
            if self._stop is not None:
                raise _Stopped()
            await asyncio.sleep(LEASE_POLL_S)

    async def _send(self, req: TeacherRequest) -> TeacherAnswer:
        """One request through the endpoint. Transient faults are retried with backoff (`max_retries`); an
        answer cut at max_tokens is asked once more at once (backoff cannot make it shorter), with
        `truncation_max_tokens` if set, and cut again it comes back as a `length` answer (rejected)."""
        last: AttemptFailed | None = None
        attempt = failures = truncations = 0
        max_tokens = self.s.max_tokens
        while True:
            attempt += 1
            worst = self.worst_case_usd(req, max_tokens=max_tokens)
            if self._stop is not None:
                raise _Stopped()
            try:
                await self.budget.reserve(worst)
            except BudgetStop:
                raise BudgetExceeded(self.budget_message(worst)) from None
            cost = 0.0
            try:
                if self._stop is not None:
                    raise _Stopped()
                self.counts["requests"] += 1
                async with self.gate():
                    answer, cost = await self._attempt(req, attempt, max_tokens)
                return answer
            except AttemptFailed as exc:
                last = exc
                cost = exc.cost
                if exc.fatal:
                    raise TeacherUnavailable(self._fatal_message(exc), final=True) from None
            finally:
                await self.budget.settle(worst, cost)
            if last.status == "truncated":
                truncations += 1
                if truncations >= TRUNCATED_ATTEMPTS:
                    return TeacherAnswer(last.content, "length")
                self.counts["retries"] += 1
                max_tokens = self.retry_max_tokens
                continue
            failures += 1
            if failures > self.s.max_retries:
                break
            self.counts["retries"] += 1
            await self.sleep(self._wait(last, failures))
        raise TeacherUnavailable(
            f"teacher call for {req.capability} failed {failures} times (last: {last.status}: "
            f"{redact(last.error, self.secrets)[:ERROR_CHARS]}); {self.endpoint} may be down or overloaded. "
            "Everything answered so far is cached: rerun to continue, or raise corpus.teacher.max_retries"
        )

    def _wait(self, exc: AttemptFailed, attempt: int) -> float:
        if exc.status == "unsupported_parameter":
            return 0.0
        if exc.retry_after is not None:
            if exc.retry_after > self.s.max_retry_after_s:
                raise TeacherUnavailable(
                    f"{self.endpoint} asks to wait {exc.retry_after:.0f}s before retrying (more than "
                    f"corpus.teacher.max_retry_after_s = {self.s.max_retry_after_s:g}s): a quota is exhausted; rerun "
                    "later (everything answered so far is cached)", final=True
                )
            return exc.retry_after * (1.0 + 0.1 * self.jitter.random())
        return backoff_delay(attempt, self.s.backoff_s, self.s.backoff_max_s, self.jitter)

    def _paid(self, usage: dict[str, Any] | None) -> float:
        if not usage:
            return 0.0
        u = parse_usage(usage)
        return self.price.cost(u["prompt_tokens"], u["completion_tokens"], u["cached_tokens"])

    def budget_message(self, worst: float) -> str:
        b = self.budget
        return (
            f"corpus.teacher.max_usd: budget ${b.max_usd:.4f} reached: ${b.spent:.4f} spent on this corpus so far "
            f"(${b.spent_before:.4f} in earlier runs), and the next call could cost up to ${worst:.6f}. Everything "
            "answered is kept in the call cache; raise corpus.teacher.max_usd and rerun to continue without "
            "repeating a call (`tinymars cost --estimate` shows what is left)"
        )

    def _fatal_message(self, exc: AttemptFailed) -> str:
        env = getattr(self.s, "api_key_env", None)
        if exc.status == "auth_error":
            where = f"the key in ${env}" if env else "the request (no key is configured)"
            return f"{self.endpoint} rejected {where}: {exc.error}; check corpus.teacher.api_key_env and the key"
        if exc.status == "not_found":
            return (f"{self.endpoint} answered 404 for model '{self.model}': {exc.error}; check corpus.teacher.model "
                    "and corpus.teacher.base_url")
        return f"{self.endpoint} refused the request ({exc.status}): {exc.error}; check the corpus.teacher settings"

    async def _attempt(self, req: TeacherRequest, attempt: int,
                       max_tokens: int | None = None) -> tuple[TeacherAnswer, float]:
        """One HTTP attempt: an answer and its cost, or AttemptFailed. Writes the attempt's lineage record."""
        import httpx2
        import openai

        max_tokens = max_tokens or self.s.max_tokens
        body = self.body(req, max_tokens)
        sent_format = "response_format" in body
        est = math.ceil(req.prompt_tokens_est * self._estimate_scale)
        await self.limiter.acquire(est + max_tokens)
        t0 = time.perf_counter()
        usage: dict[str, Any] | None = None
        try:
            try:
                async with asyncio.timeout(self.s.timeout_s):
                    # the client's documented raw path (`post(..., cast_to=Response)`): same auth, errors and
                    # connection pool as `chat.completions.create`, without its per-call typed transform of
                    # the body (milliseconds of CPU, the bottleneck at high concurrency); we read the body
                    # ourselves, so a malformed one is ours to count
                    raw = await self.api.post("/chat/completions", cast_to=httpx2.Response, body=body)
                    text = (await raw.aread()).decode("utf-8", errors="replace")
            except (TimeoutError, openai.APITimeoutError):
                raise AttemptFailed("timeout", f"no answer within {self.s.timeout_s:g}s") from None
            except openai.APIStatusError as exc:
                raise self._status_failure(exc, sent_format) from None
            except openai.APIConnectionError as exc:
                cause = type(exc.__cause__ or exc).__name__
                raise AttemptFailed("connection_error", f"connection failed: {cause}") from None
            except openai.OpenAIError as exc:
                raise AttemptFailed("client_error", f"{type(exc).__name__}: {exc}") from None
            answer, usage = self.parse_completion(text)
        except AttemptFailed as exc:
            exc.error = redact(exc.error, self.secrets)  # server text may echo the key; it goes no further
            self.limiter.adjust(est + max_tokens, 0)
            exc.cost = self._paid(exc.usage)
            if exc.status == "truncated" and not exc.usage:  # a billed answer that did not say what it cost
                exc.cost = self.price.cost(est, max_tokens)
                exc.error += "; no usage in the answer: cost booked at the worst case"
            self.record(req, exc.status, attempt, time.perf_counter() - t0, exc.usage, exc.cost, exc.error)
            raise
        latency = time.perf_counter() - t0
        u = parse_usage(usage)
        if u["prompt_tokens"] > est:  # keep the worst case a worst case
            self._estimate_scale *= u["prompt_tokens"] / est
        self.limiter.adjust(est + max_tokens, u["prompt_tokens"] + u["completion_tokens"])
        cost = self._paid(usage) if usage else self.price.cost(est, max_tokens)
        self.keep(req, answer, usage, cost, attempt, latency)
        return answer, cost

    def keep(self, req: TeacherRequest, answer: TeacherAnswer, usage: dict[str, Any] | None, cost: float,
             attempt: int, latency_s: float | None) -> None:
        """Store an answer and its journal record durably, in one transaction, before it is used: a kill
        after this loses nothing and pays nothing twice."""
        note = None if usage else "no usage in the answer: cost booked at the worst case"
        status = "ok" if answer.finish_reason != "content_filter" else "content_filter"
        rec = self.record(req, status, attempt, latency_s, usage, cost, note, journal=False)
        self.cache.put(req.key, self.model, {"content": answer.content, "finish_reason": answer.finish_reason,
                                             "usage": usage or {}}, journal=(self.invocation, rec))
        self.counts["answered"] += 1

    def _status_failure(self, exc: Any, sent_format: bool) -> AttemptFailed:
        status = int(exc.status_code)
        message = _server_message(exc)
        if status == 400:
            adapted = self._adapt(message, sent_format)
            if adapted:
                return AttemptFailed("unsupported_parameter", f"HTTP 400: {message}")
        wait = retry_after_s(exc.response.headers if exc.response is not None else None)
        if status == 429:
            return AttemptFailed("rate_limited", f"HTTP 429: {message}", wait)
        if status >= 500 or status in (408, 409):
            return AttemptFailed("server_error", f"HTTP {status}: {message}", wait)
        return AttemptFailed(FATAL_STATUS.get(status, "bad_request"), f"HTTP {status}: {message}", fatal=True)

    def _adapt(self, message: str, sent_format: bool) -> bool:
        """Drop or rename a parameter the server refused; True when the request changed (retry at once)."""
        low = message.lower()
        if "max_completion_tokens" in low and self.token_param == "max_tokens":
            self.token_param = "max_completion_tokens"
        elif "temperature" in low and self.send_temperature:
            self.send_temperature = False
        elif sent_format and self.structured == "auto":
            self.structured = "off"
        else:
            return False
        self.log(f"{self.endpoint} refused a parameter (HTTP 400: {redact(message, self.secrets)[:120]}); adapted "
                 "the requests for this run and retrying")
        return True

    def parse_completion(self, text: str) -> tuple[TeacherAnswer, dict[str, Any] | None]:
        """A completion body -> (answer, usage); a body that is not a usable completion raises AttemptFailed."""
        try:
            data = json.loads(text)
        except ValueError:
            raise AttemptFailed("malformed", f"the body is not JSON: {text[:80]!r}") from None
        if not isinstance(data, dict):
            raise AttemptFailed("malformed", "the body is not a JSON object")
        usage = data.get("usage") if isinstance(data.get("usage"), dict) else None
        choices = data.get("choices")
        if not isinstance(choices, list) or not choices:
            raise AttemptFailed("empty_choices", "the answer has no choices", usage=usage)
        choice = choices[0] if isinstance(choices[0], dict) else {}
        message = choice.get("message") if isinstance(choice.get("message"), dict) else {}
        content = message.get("content")
        finish = str(choice.get("finish_reason") or "stop")
        if finish == "length":
            raise AttemptFailed("truncated", "finish_reason=length: cut at max_tokens", usage=usage,
                                content=content or "")
        if finish == "content_filter":
            return TeacherAnswer(content or "", "content_filter"), usage
        if not isinstance(content, str) or not content.strip():
            raise AttemptFailed("empty_content", "the answer's message has no content", usage=usage)
        return TeacherAnswer(content, finish), usage


def _server_message(exc: Any) -> str:
    """The server's reason: OpenAI's `{"error": {"message"}}`, FastAPI's `{"detail"}` (transformers serve and
    other self-hosted servers), or a plain-text body; else the client's own text."""
    body = getattr(exc, "body", None)
    msg: Any = None
    if isinstance(body, dict):
        err = body.get("error", body)
        msg = (err.get("message") or err.get("detail")) if isinstance(err, dict) else err
    elif isinstance(body, str):
        msg = body.strip()
    if msg:
        return (msg if isinstance(msg, str) else json.dumps(msg))[:ERROR_CHARS]
    return str(getattr(exc, "message", "") or type(exc).__name__)[:ERROR_CHARS]


def json_values(content: str, brackets: str = "{}") -> tuple[str, list[Any]]:
    """The answer's text (the inside of a ```json fence when there is one) and every JSON value found in it:
    the whole text, then the span from the first opening to the last closing bracket of each pair in
    `brackets` ("{}", "{}[]"). Servers without structured output wrap JSON in fences and preambles."""
    text = (content or "").strip()
    fence = re.search(r"```(?:json)?\s*(.*?)```", text, re.S)
    if fence:
        text = fence.group(1).strip()
    candidates = [text] + [text[text.find(o): text.rfind(c) + 1] for o, c in zip(brackets[::2], brackets[1::2],
                                                                                   strict=True) if o in text]
    values = []
    for candidate in candidates:
        try:
            values.append(json.loads(candidate))
        except ValueError:
            continue
    return text, values


def parse_target(content: str) -> str | None:
    """The target in a teacher answer, tolerant of how servers without structured output reply:
    `{"target": ...}`, the same inside a code fence or after a preamble, a bare JSON string, or plain
    text. None when the answer holds JSON-looking text that cannot be read (the row is rejected)."""
    text, values = json_values(content)
    if values:
        value = values[0].get("target") if isinstance(values[0], dict) else values[0]
        return value.strip() if isinstance(value, str) and value.strip() else None
    if "{" in text or "}" in text:
        return None
    text = re.sub(r"^(target|reply|answer)\s*:\s*", "", text, flags=re.I).strip().strip('"').strip()
    return text or None
