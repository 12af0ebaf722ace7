"""What paces the teacher client: the money budget, the requests/tokens-per-minute limiter, backoff, and the
guard that stops a stage whose answers keep running past max_tokens.

Kept apart from the HTTP client so each rule is small, has no network in it, and is tested with a
fake clock.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from email.utils import parsedate_to_datetime


class BudgetStop(Exception):
    """The next call's worst case does not fit in what is left of the budget."""


class Budget:
    """Money for new calls. A call is launched only when, even at its worst case (every prompt token
    uncached, `max_tokens` generated), the spend cannot pass `max_usd`: the money spent by earlier
    runs on this corpus, plus this run's, plus the worst case of every call still in flight.

    When a call does not fit only because of calls in flight, it waits for them to settle (their real
    cost is usually far below the worst case) instead of stopping early.
    """

    def __init__(self, max_usd: float | None, spent_before: float = 0.0):
        self.max_usd = max_usd
        self.spent_before = spent_before
        self.spent_now = 0.0
        self.reserved = 0.0
        self.in_flight = 0  # counted, not inferred from `reserved`: float residue must never look like a call
        self._changed = asyncio.Condition()

    @property
    def spent(self) -> float:
        return self.spent_before + self.spent_now

    def left(self) -> float | None:
        return None if self.max_usd is None else self.max_usd - self.spent

    async def reserve(self, worst_usd: float) -> None:
        """Hold `worst_usd` for one call, or raise BudgetStop when it can never fit."""
        if self.max_usd is None:
            return
        async with self._changed:
            while self.spent + self.reserved + worst_usd > self.max_usd + 1e-12:
                if self.in_flight == 0:
                    raise BudgetStop()
                await self._changed.wait()
            self.reserved += worst_usd
            self.in_flight += 1

    async def settle(self, worst_usd: float, actual_usd: float, reserved: bool = True) -> None:
        """Release a reservation (unless `reserved` is False) and book what the call really cost."""
        async with self._changed:
            if self.max_usd is not None and reserved:
                self.in_flight -= 1
                self.reserved = max(0.0, self.reserved - worst_usd) if self.in_flight else 0.0
            self.spent_now += actual_usd
            self._changed.notify_all()


class RateLimiter:
    """Requests- and tokens-per-minute as two token buckets that refill continuously.

    A bucket starts full (a provider counts per minute, so a burst of `rpm` requests is allowed), and a
    request asking for more tokens than a whole minute's allowance waits for a full bucket instead of
    forever. `adjust` books the difference once the real token count is known.
    """

    def __init__(
        self,
        requests_per_minute: int | None,
        tokens_per_minute: int | None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ):
        self.rpm, self.tpm = requests_per_minute, tokens_per_minute
        self.clock, self.sleep = clock, sleep
        self.requests = float(requests_per_minute or 0)
        self.tokens = float(tokens_per_minute or 0)
        self.stamp = clock()
        self._lock = asyncio.Lock()

    def _refill(self) -> None:
        now = self.clock()
        elapsed, self.stamp = max(0.0, now - self.stamp), now
        if self.rpm:
            self.requests = min(float(self.rpm), self.requests + elapsed * self.rpm / 60.0)
        if self.tpm:
            self.tokens = min(float(self.tpm), self.tokens + elapsed * self.tpm / 60.0)

    def wait_needed(self, tokens: int) -> float:
        """Seconds until a request of `tokens` fits (0 when it fits now)."""
        self._refill()
        wait = 0.0
        if self.rpm and self.requests < 1.0:
            wait = max(wait, (1.0 - self.requests) * 60.0 / self.rpm)
        if self.tpm:
            need = min(float(tokens), float(self.tpm))
            if self.tokens < need:
                wait = max(wait, (need - self.tokens) * 60.0 / self.tpm)
        return wait

    async def acquire(self, tokens: int) -> None:
        if not (self.rpm or self.tpm):
            return
        async with self._lock:  # first come, first served
            while (wait := self.wait_needed(tokens)) > 0:
                await self.sleep(wait)
            if self.rpm:
                self.requests -= 1.0
            if self.tpm:
                self.tokens -= min(float(tokens), float(self.tpm))

    def adjust(self, estimated: int, actual: int) -> None:
        """Book the real token count of a finished request (the bucket may go negative: a debt)."""
        if self.tpm:
            self.tokens -= actual - min(estimated, self.tpm)


def backoff_delay(attempt: int, base_s: float, max_s: float, rng: random.Random) -> float:
    """Exponential backoff with jitter in [50%, 100%]: base * 2^(attempt-1), capped at max_s."""
    return min(max_s, base_s * 2 ** max(0, attempt - 1)) * (0.5 + 0.5 * rng.random())


def retry_after_s(headers: Mapping[str, str] | None) -> float | None:
    """The wait a server asks for: `retry-after-ms`, else `retry-after` (seconds or an HTTP date)."""
    if not headers:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            value = float(ms) / 1000.0
            if math.isfinite(value) and value >= 0:
                return value
        except ValueError:
            pass
    raw = headers.get("retry-after")
    if not raw:
        return None
    try:
        value = float(raw)
        return value if math.isfinite(value) and value >= 0 else None
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


MIN_ANSWERS_FOR_TRUNCATION_STOP = 20  # fewer answers say too little about a model's truncation rate
TRUNCATED_ATTEMPTS = 2  # a call cut at max_tokens is asked once more (at once), then rejected


class TruncationGuard:
    """Stops a stage whose answers keep running past max_tokens, before it pays for the rest.

    A truncation is not transient: the same request at the same `max_tokens` runs long again. So each
    call is asked at most twice, and once `min_answers` calls have a final answer, a share of truncated
    ones above `max_rate` stops the stage with the numbers and the setting to change.
    """

    def __init__(self, max_rate: float, max_tokens: int, retry_max_tokens: int | None = None,
                 min_answers: int = MIN_ANSWERS_FOR_TRUNCATION_STOP):
        self.max_rate, self.max_tokens, self.retry_max_tokens = max_rate, max_tokens, retry_max_tokens
        self.min_answers = min_answers
        self.answers = self.truncated = 0

    def observe(self, truncated: bool) -> None:
        """One call's final answer (after its truncation retry), from the endpoint (not the cache)."""
        self.answers += 1
        self.truncated += bool(truncated)

    @property
    def rate(self) -> float:
        return self.truncated / self.answers if self.answers else 0.0

    def tripped(self) -> bool:
        return self.answers >= self.min_answers and self.rate > self.max_rate

    def message(self) -> str:
        again = "" if self.retry_max_tokens is None else f" (and again at {self.retry_max_tokens} on their retry)"
        return (
            f"{100 * self.rate:.0f}% of answers were cut at max_tokens={self.max_tokens}{again}: raise "
            f"corpus.teacher.max_tokens (or set corpus.teacher.truncation_max_tokens for the one retry). "
            f"{self.truncated} of the {self.answers} answers so far were truncated, above "
            f"corpus.teacher.max_truncation_rate = {self.max_rate:g}, so the stage stopped early; every call paid "
            "so far is recorded, and every complete answer is in the call cache (a rerun does not pay for it again)"
        )
