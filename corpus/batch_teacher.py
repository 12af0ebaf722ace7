"""The Batch API backend: the same `answer_all` as the online client, at batch prices (hours, not seconds).

Requests not in the call cache go into one JSONL file, uploaded and submitted as a batch job. The job
id is stored in the call cache (and a `batch_submitted` lineage record made) *before* polling starts,
so a rerun after a kill resumes polling that job instead of paying for a second one. Each answered
item is stored in the cache as it is read; failed items go into the next round (at most `max_retries`
more rounds each). A truncated item (`finish_reason=length`) goes into one more round only (with
`truncation_max_tokens` if set), then comes back truncated; the client's truncation guard judges each
round's final answers. The budget holds the worst case of a whole batch before it is submitted; a
batch that does not fit is cut to the prefix that does.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from typing import Any

from corpus.openai_teacher import (
    AttemptFailed,
    BudgetExceeded,
    TeacherAnswer,
    TeacherClient,
    TeacherRequest,
    TeacherUnavailable,
    TruncationStop,
    parse_usage,
    redact,
)
from corpus.teacher_limits import TRUNCATED_ATTEMPTS, BudgetStop, backoff_delay

ENDPOINT = "/v1/chat/completions"
DONE = ("completed", "failed", "expired", "cancelled")


class BatchTeacher:
    def __init__(self, client: TeacherClient, poll_s: float = 30.0):
        self.client, self.poll_s = client, poll_s
        self.model, self.params = client.model, client.params
        self.truncations: Counter[str] = Counter()  # times each request came back cut at max_tokens
        self.judged: set[str] = set()  # requests whose final answer the truncation guard has counted

    async def answer_all(
        self, requests: list[TeacherRequest], progress: Callable[[dict[str, Any]], None] | None = None
    ) -> dict[str, TeacherAnswer]:
        c = self.client
        answers: dict[str, TeacherAnswer] = {}
        todo: dict[str, TeacherRequest] = {}
        for req in requests:
            if req.key in answers or req.key in todo:
                continue
            hit = c.cached(req)
            if hit is not None:
                answers[req.key] = hit
            else:
                todo[req.key] = req
        truncated: dict[str, TeacherAnswer] = {}
        failures: Counter[str] = Counter()  # rounds each request failed in otherwise
        for job in c.cache.open_batches():
            if any(k in todo for k in job["call_keys"]):
                c.log(f"[corpus] resuming batch {job['batch_id']} (submitted earlier) instead of resubmitting")
                cost = await self._collect(job["batch_id"], 0, todo, answers, truncated, progress, len(requests))
                await c.budget.settle(0.0, cost, reserved=False)
        round_ = 0
        while True:
            remaining = [r for k, r in todo.items() if k not in answers and failures[k] <= c.s.max_retries
                         and self.truncations[k] < TRUNCATED_ATTEMPTS]
            self._watch_truncation(todo, answers)
            if not remaining:
                break
            round_ += 1
            cut_before = Counter(self.truncations)
            batch_id, worst, sent = await self._submit(remaining, round_)
            cost = 0.0
            try:
                cost = await self._collect(batch_id, round_, todo, answers, truncated, progress, len(requests))
            finally:
                await c.budget.settle(worst, cost)
            failures.update(k for k in sent if k not in answers and self.truncations[k] == cut_before[k])
        missing = [k for k in todo if k not in answers and k not in truncated]
        if missing:
            raise TeacherUnavailable(
                f"{len(missing)} batch requests still failed after {c.s.max_retries + 1} rounds; everything "
                "answered is cached: rerun to continue, or raise corpus.teacher.max_retries",
                list(c.records),
            )
        return {**truncated, **answers}

    def _watch_truncation(self, todo: dict[str, TeacherRequest], answers: dict[str, TeacherAnswer]) -> None:
        """Feed the client's truncation guard the final answers of the rounds so far (each once); stop when it
        trips, before another batch is paid for."""
        c = self.client
        for key in todo:
            if key in self.judged:
                continue
            if key in answers:
                c.truncation.observe(False)
            elif self.truncations[key] >= TRUNCATED_ATTEMPTS:
                c.truncation.observe(True)
            else:
                continue
            self.judged.add(key)
        if c.truncation.tripped():
            raise TruncationStop(c.truncation.message(), list(c.records))

    async def _submit(self, remaining: list[TeacherRequest], round_: int) -> tuple[str, float, list[str]]:
        """Upload and submit the requests that fit in the budget; record the job before anything else. A
        request cut at max_tokens before is asked with `truncation_max_tokens` (same call key)."""
        c = self.client
        chosen, worst = [], 0.0
        left = c.budget.left()
        for req in remaining:
            cost = c.worst_case_usd(req, batch=True, max_tokens=self._max_tokens(req))
            if left is not None and worst + cost > left:
                break
            chosen.append(req)
            worst += cost
        try:
            if not chosen:
                raise BudgetStop()
            await c.budget.reserve(worst)
        except BudgetStop:
            raise BudgetExceeded(c.budget_message(c.worst_case_usd(remaining[0], batch=True)),
                                 list(c.records)) from None
        lines = [json.dumps({"custom_id": r.key, "method": "POST", "url": ENDPOINT,
                             "body": c.body(r, self._max_tokens(r))}) for r in chosen]
        data = ("\n".join(lines) + "\n").encode()
        upload = await self._retrying(lambda: c.api.files.create(file=("teacher-batch.jsonl", data), purpose="batch"))
        job = await self._retrying(lambda: c.api.batches.create(
            input_file_id=upload.id, endpoint=ENDPOINT, completion_window="24h"))
        c.cache.save_batch(job.id, upload.id, [r.key for r in chosen])
        c.record(TeacherRequest(f"batch:{job.id}", "batch", [], None, 0), "batch_submitted", round_,
                 error=f"{len(chosen)} requests, input file {upload.id}")
        c.log(f"[corpus] submitted batch {job.id}: {len(chosen)} requests (worst case ${worst:.4f})")
        return job.id, worst, [r.key for r in chosen]

    def _max_tokens(self, req: TeacherRequest) -> int:
        return self.client.retry_max_tokens if self.truncations[req.key] else self.client.s.max_tokens

    async def _collect(self, batch_id: str, round_: int, todo: dict[str, TeacherRequest],
                       answers: dict[str, TeacherAnswer], truncated: dict[str, TeacherAnswer],
                       progress: Callable[[dict[str, Any]], None] | None, total: int) -> float:
        """Poll a job until it ends, then store every answered item in the cache; returns what they cost."""
        c = self.client
        while True:
            job = await self._retrying(lambda: c.api.batches.retrieve(batch_id))
            if job.status in DONE:
                break
            counts = job.request_counts
            c.log(f"[corpus] batch {batch_id}: {job.status}"
                  + (f", {counts.completed}/{counts.total} done" if counts is not None else ""))
            await c.sleep(self.poll_s)
        cost = 0.0
        for file_id in (job.output_file_id, job.error_file_id):
            if not file_id:
                continue
            content = await self._retrying(lambda fid=file_id: c.api.files.content(fid))
            for line in content.text.splitlines():
                if line.strip():
                    cost += self._item(json.loads(line), round_, todo, answers, truncated)
        c.cache.close_batch(batch_id, job.status)
        if job.status != "completed":
            c.log(f"[corpus] batch {batch_id} ended {job.status}; unanswered requests go into a new batch")
        if progress is not None:
            progress(c.snapshot(total, len(answers)))
        return cost

    def _item(self, item: dict[str, Any], round_: int, todo: dict[str, TeacherRequest],
              answers: dict[str, TeacherAnswer], truncated: dict[str, TeacherAnswer]) -> float:
        """Store one output line's answer (or record its failure); returns what it cost."""
        c = self.client
        key = str(item.get("custom_id"))
        req = todo.get(key) or TeacherRequest(key, "unknown", [], None, 0)
        response = item.get("response") or {}
        body = response.get("body")
        usage = body.get("usage") if isinstance(body, dict) else None
        cost = self._cost(usage)
        if response.get("status_code") != 200 or not isinstance(body, dict):
            error = item.get("error") or (body or {}).get("error") or f"status {response.get('status_code')}"
            c.record(req, "batch_item_error", round_, None, usage, cost, redact(json.dumps(error), c.secrets))
            return cost
        try:
            answer, usage = c.parse_completion(json.dumps(body))
        except AttemptFailed as exc:
            c.record(req, exc.status, round_, None, exc.usage, self._cost(exc.usage), exc.error)
            if exc.status == "truncated":
                truncated[key] = TeacherAnswer(exc.content, "length")
                self.truncations[key] += 1
            return self._cost(exc.usage)
        truncated.pop(key, None)
        c.keep(req, answer, usage, cost, round_, None)
        answers[key] = answer
        return cost

    def _cost(self, usage: dict[str, Any] | None) -> float:
        if not usage:
            return 0.0
        u = parse_usage(usage)
        return self.client.price.cost(u["prompt_tokens"], u["completion_tokens"], u["cached_tokens"], batch=True)

    async def _retrying(self, call: Callable[[], Any]) -> Any:
        """File and batch endpoints are free to call again: retry transient failures with backoff."""
        import openai

        c = self.client
        for attempt in range(1, c.s.max_retries + 2):
            try:
                return await call()
            except (openai.APIConnectionError, openai.RateLimitError, openai.InternalServerError) as exc:
                if attempt > c.s.max_retries:
                    raise TeacherUnavailable(
                        f"the Batch API at {c.endpoint} kept failing ({type(exc).__name__}); the submitted job ids "
                        "are kept in the call cache: rerun to resume polling", list(c.records)) from None
                await c.sleep(backoff_delay(attempt, c.s.backoff_s, c.s.backoff_max_s, c.jitter))
            except openai.APIStatusError as exc:
                raise TeacherUnavailable(
                    f"the Batch API at {c.endpoint} refused the request (HTTP {exc.status_code}): "
                    f"{redact(str(getattr(exc, 'message', '')), c.secrets)[:300]}", list(c.records)) from None
        raise AssertionError("unreachable")
