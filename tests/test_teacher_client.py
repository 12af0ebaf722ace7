"""Teacher client against a real OpenAI-compatible server on 127.0.0.1: faults, retries, accounting,
structured-output fallback, the cache, prices, the budget and the rate limiter."""

from __future__ import annotations

import asyncio
import json
import re
from collections import Counter
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path

import pytest

from corpus.call_cache import CallCache, call_key
from corpus.openai_teacher import (
    MissingKey,
    TeacherClient,
    TeacherRequest,
    TeacherUnavailable,
    TruncationStop,
    api_key_from_env,
    parse_target,
    public_endpoint,
)
from corpus.teacher_limits import Budget, BudgetStop, RateLimiter, retry_after_s
from tests.openai_server import FakeOpenAI, request_key
from tests.teacher_support import FAKE_KEY, KEY_ENV, files_containing, make_profile, word_requests
from tinymars.prices import Price, PriceError, resolve_price

PRICE = resolve_price("gpt-4o-mini")
# the lineage status each server outcome must produce
STATUS_OF = {"ok": "ok", "429": "rate_limited", "500": "server_error", "503": "server_error", "timeout": "timeout",
             "drop": "connection_error", "malformed": "malformed", "html": "malformed", "empty": "empty_choices",
             "length": "truncated"}


def _client(fake: FakeOpenAI, tmp_path: Path, key: str | None = FAKE_KEY, **teacher) -> TeacherClient:
    settings = make_profile(fake.base_url, **teacher).corpus.teacher
    return TeacherClient(settings, key, CallCache(tmp_path / "calls.sqlite"), PRICE)


async def _answer_all(client: TeacherClient, requests: list[TeacherRequest]):
    try:
        return await client.answer_all(requests)
    finally:
        await client.close()


def test_every_fault_is_retried_and_every_attempt_is_recorded(tmp_path):
    faults = ["429", "500", "503", "timeout", "drop", "malformed", "html", "empty", "length"]
    reqs = word_requests(6)
    with FakeOpenAI(api_key=FAKE_KEY, faults=faults, timeout_sleep_s=0.8) as fake:
        client = _client(fake, tmp_path, max_retries=8)
        answers = asyncio.run(_answer_all(client, reqs))
        outcomes = Counter(fake.outcomes)
        usage_sent = list(fake.usage_sent)
    assert len(answers) == 6
    for i, req in enumerate(reqs):
        assert parse_target(answers[req.key].content) == f"Rex{i} first: let us build on Rex{i} today."
    # lineage statuses match the server's own outcome counts, one record per HTTP attempt
    expected = Counter()
    for outcome, n in outcomes.items():
        expected[STATUS_OF[outcome]] += n
    assert Counter(r["status"] for r in client.records) == expected
    assert outcomes["ok"] == 6 and sum(outcomes.values()) == 6 + len(faults)
    for req in reqs:  # attempts of one call are numbered 1..n, the last one answered
        mine = [r for r in client.records if r["call_key"] == req.key]
        assert [r["attempt"] for r in mine] == list(range(1, len(mine) + 1)) and mine[-1]["status"] == "ok"
    # tokens are the server's; reasoning stays inside completion (never added twice)
    billed = [r for r in client.records if r["status"] in ("ok", "truncated")]
    for field in ("prompt_tokens", "completion_tokens"):
        assert sum(r[field] for r in billed) == sum(u[field] for u in usage_sent)
    assert sum(r["cached_tokens"] for r in billed) == sum(u["prompt_tokens_details"]["cached_tokens"]
                                                          for u in usage_sent) > 0
    assert all(r["reasoning_tokens"] == 3 for r in billed)
    for r in billed:  # gpt-4o-mini: $0.15 / 1M uncached input, $0.075 cached, $0.60 output
        by_hand = ((r["prompt_tokens"] - r["cached_tokens"]) * 0.15 + r["cached_tokens"] * 0.075
                   + r["completion_tokens"] * 0.60) / 1e6
        assert r["price_usd"] == pytest.approx(by_hand, rel=1e-12) and r["price_usd"] > 0
    assert all(r["price_usd"] == 0 for r in client.records if r["status"] not in ("ok", "truncated"))


def test_retry_after_is_honoured(tmp_path):
    reqs = word_requests(1)
    with FakeOpenAI(faults=["429"], retry_after_ms=250) as fake:
        asyncio.run(_answer_all(_client(fake, tmp_path, backoff_s=0.0), reqs))
        server_key = request_key({"model": "gpt-4o-mini", "messages": reqs[0].messages, "temperature": 0.7,
                                  "max_tokens": 256, "seed": 0})
        first, second = fake.requests_for(server_key)
    assert (first["outcome"], second["outcome"]) == ("429", "ok")
    assert second["t"] - first["t"] >= 0.25  # waited at least what retry-after-ms asked for


def _sleep_recorder() -> tuple[list[float], object]:
    slept: list[float] = []

    async def sleep(s: float) -> None:
        slept.append(s)

    return slept, sleep


def test_a_truncated_call_is_asked_once_more_at_once_then_rejected_and_not_cached(tmp_path):
    reqs = word_requests(3)
    slept, sleep = _sleep_recorder()
    with FakeOpenAI(answer_tokens=100) as fake:  # every answer runs past max_tokens=48
        settings = make_profile(fake.base_url, max_tokens=48, max_retries=6).corpus.teacher
        client = TeacherClient(settings, FAKE_KEY, CallCache(tmp_path / "calls.sqlite"), PRICE, sleep=sleep)
        answers = asyncio.run(_answer_all(client, reqs))
        per_key = Counter(fake.attempts)
        usage = list(fake.usage_sent)
    assert fake.outcomes == Counter(length=6) and sorted(per_key.values()) == [2, 2, 2]  # not 7 each
    assert slept == []  # no backoff: waiting does not make an answer shorter
    assert all(answers[r.key].truncated for r in reqs)
    assert [r["status"] for r in client.records] == ["truncated"] * 6
    assert sorted(r["attempt"] for r in client.records) == [1, 1, 1, 2, 2, 2]
    assert all(u["completion_tokens"] == 48 for u in usage)  # billed up to the limit, as a real server does
    for r in client.records:  # every cut attempt is paid for and priced
        assert r["completion_tokens"] == 48 and r["price_usd"] == pytest.approx(
            ((r["prompt_tokens"] - r["cached_tokens"]) * 0.15 + r["cached_tokens"] * 0.075 + 48 * 0.60) / 1e6)
    assert all(client.cache.get(r.key) is None for r in reqs)


def test_the_truncation_retry_asks_for_truncation_max_tokens_under_the_same_call_key(tmp_path):
    reqs = word_requests(3)
    slept, sleep = _sleep_recorder()
    with FakeOpenAI(answer_tokens=100) as fake:  # cut at 64, complete at 128
        settings = make_profile(fake.base_url, max_tokens=64, truncation_max_tokens=128).corpus.teacher
        client = TeacherClient(settings, FAKE_KEY, CallCache(tmp_path / "calls.sqlite"), PRICE, sleep=sleep)
        answers = asyncio.run(_answer_all(client, reqs))
        outcomes, usage = Counter(fake.outcomes), list(fake.usage_sent)
    assert outcomes == Counter(length=3, ok=3) and slept == []
    # the first asks were cut at 64 (billed 64); the retries, allowed 128, finished (the server's rule: 100 needed)
    assert sorted(u["completion_tokens"] for u in usage)[3:] == [64, 64, 64]
    for i, req in enumerate(reqs):
        assert parse_target(answers[req.key].content) == f"Rex{i} first: let us build on Rex{i} today."
        assert client.cache.get(req.key) is not None  # stored under the profile's call key
        mine = [r["status"] for r in client.records if r["call_key"] == req.key]
        assert mine == ["truncated", "ok"]


def test_a_transient_fault_between_truncations_is_backed_off_but_the_truncation_retry_is_not(tmp_path):
    slept, sleep = _sleep_recorder()
    with FakeOpenAI(faults=["length", "500", "length", "ok"]) as fake:
        settings = make_profile(fake.base_url, max_retries=3).corpus.teacher
        client = TeacherClient(settings, FAKE_KEY, CallCache(tmp_path / "calls.sqlite"), PRICE, sleep=sleep)
        answers = asyncio.run(_answer_all(client, word_requests(1)))
        assert sum(fake.outcomes.values()) == 3  # the second truncation is final: "ok" is never asked for
    assert [r["status"] for r in client.records] == ["truncated", "server_error", "truncated"]
    assert len(slept) == 1 and slept[0] > 0  # one backoff, after the 500 only
    assert next(iter(answers.values())).truncated


def _cut_every_tenth(key: str, body: dict) -> str | None:
    """Cut the answers of the requests numbered 0, 10, 20, ... (word_requests' `Rex<i>`)."""
    number = int(re.search(r"Rex(\d+)", body["messages"][-1]["content"]).group(1))
    return "length" if number % 10 == 0 else None


@pytest.mark.parametrize("max_rate", [0.2, 0.05])
def test_the_truncation_guard_stops_only_above_its_rate(tmp_path, max_rate):
    reqs = word_requests(30)  # 3 of 30 (10%) are cut, twice each
    with FakeOpenAI(fault_fn=_cut_every_tenth) as fake:
        client = _client(fake, tmp_path, max_truncation_rate=max_rate, max_concurrency=1)
        if max_rate > 0.1:
            answers = asyncio.run(_answer_all(client, reqs))
            assert sum(a.truncated for a in answers.values()) == 3 and fake.outcomes["length"] == 6
            return
        with pytest.raises(TruncationStop) as info:
            asyncio.run(_answer_all(client, reqs))
        sent = sum(fake.outcomes.values())
    # in order, one at a time: the 20th answer has 2 of 20 cut (10% > 5%): the run stops there
    assert "10% of answers were cut at max_tokens=256: raise corpus.teacher.max_tokens" in str(info.value)
    assert "2 of the 20 answers" in str(info.value) and info.value.final
    assert sent == 18 * 1 + 2 * 2 == len(info.value.teacher_calls)  # every paid attempt is handed back


def test_the_corpus_stage_stops_early_when_answers_keep_running_past_max_tokens(tmp_path, no_teacher_gate,
                                                                               monkeypatch):
    from corpus.openai_teacher import TeacherError
    from tasks.corpus import corpus_task
    from tinymars.lineage import Lineage

    monkeypatch.setenv(KEY_ENV, FAKE_KEY)
    home = tmp_path / "home"
    with FakeOpenAI(answer_tokens=100) as fake:  # 66 calls planned; every answer needs 100 tokens
        with pytest.raises(TruncationStop) as info:
            corpus_task.fn(make_profile(fake.base_url, max_tokens=48, max_retries=6), str(home))
        per_key, sent = Counter(fake.attempts), sum(fake.outcomes.values())
    exc = info.value
    assert isinstance(exc, TeacherError) and exc.final  # no stage retry: the same max_tokens cuts again
    assert str(exc).startswith("100% of answers were cut at max_tokens=48: raise corpus.teacher.max_tokens")
    assert max(per_key.values()) == 2 and sent < 66  # stopped after ~20 answers, not 66 x 7 attempts
    assert len(exc.teacher_calls) == sent and {c["status"] for c in exc.teacher_calls} == {"truncated"}
    # the flow records a failed stage's calls from the exception (flows/iteration.py); so does this
    lin = Lineage(home / "lineage.duckdb")
    lin.record_stage("run-cut", {"stage": "corpus", "status": "failed", "duration_s": 1.0,
                                 "error": f"TruncationStop: {exc}", "teacher_calls": exc.teacher_calls})
    rows = lin.query("SELECT status, price_usd, completion_tokens FROM teacher_calls WHERE run_id = 'run-cut'")
    assert len(rows) == sent and all(r["price_usd"] > 0 and r["completion_tokens"] == 48 for r in rows)


@pytest.mark.parametrize("retry_max_tokens", [None, 128])
def test_batch_truncations_get_one_more_round_then_stop_or_complete(tmp_path, no_teacher_gate, monkeypatch,
                                                                    retry_max_tokens):
    from tasks.corpus import corpus_task

    monkeypatch.setenv(KEY_ENV, FAKE_KEY)
    calls = 3 * 4 * 3 + 3 * (4 + 1) * 2
    with FakeOpenAI(answer_tokens=100) as fake:
        profile = make_profile(fake.base_url, batch=True, batch_poll_s=0.01, max_tokens=64, max_retries=6,
                               truncation_max_tokens=retry_max_tokens)
        if retry_max_tokens is None:
            with pytest.raises(TruncationStop) as info:
                corpus_task.fn(profile, str(tmp_path))
            assert "100% of answers were cut at max_tokens=64" in str(info.value)
            assert len(fake.batches) == 2 and fake.batch_outcomes == Counter(length=2 * calls)  # not 7 rounds
            assert sum(c["status"] == "truncated" for c in info.value.teacher_calls) == 2 * calls
            return
        result = corpus_task.fn(profile, str(tmp_path))
        assert len(fake.batches) == 2 and fake.batch_outcomes == Counter(length=calls, ok=calls)
    statuses = Counter(c["status"] for c in result["teacher_calls"])
    assert statuses["truncated"] == calls and statuses["accepted"] + statuses["rejected"] == calls


def test_a_rejected_key_is_fatal_at_once_and_never_leaks(tmp_path):
    wrong = "sk-test-WRONG-9f8e7d6c5b4a3z2y1x"
    reqs = word_requests(3)
    with FakeOpenAI(api_key=FAKE_KEY) as fake:
        client = _client(fake, tmp_path, key=wrong)
        with pytest.raises(TeacherUnavailable) as info:
            asyncio.run(_answer_all(client, reqs))
        answered = sum(fake.outcomes.values())
    exc = info.value
    assert exc.final and "rejected the key in $TINYMARS_TEST_TEACHER_KEY" in str(exc)
    assert answered <= 4  # no retries: at most the requests already in flight
    text = str(exc) + repr(exc) + json.dumps(exc.teacher_calls) + json.dumps(client.records)
    assert wrong not in text and FAKE_KEY not in text
    assert "Incorrect API key provided: [redacted]" in text  # the server echoed it; we did not keep it
    client.cache.close()
    assert files_containing(tmp_path, [wrong, FAKE_KEY, wrong[8:]]) == []


def test_structured_output_falls_back_to_tolerant_parsing(tmp_path):
    reqs = word_requests(5)
    with FakeOpenAI(json_schema=False) as fake:
        client = _client(fake, tmp_path, max_concurrency=1)
        answers = asyncio.run(_answer_all(client, reqs))
        assert fake.outcomes["400"] == 1 and fake.outcomes["ok"] == 5
    assert [r["status"] for r in client.records].count("unsupported_parameter") == 1
    for i, req in enumerate(reqs):
        assert answers[req.key].content.startswith("Sure! Here it is:\n```json")
        assert parse_target(answers[req.key].content) == f"Rex{i} first: let us build on Rex{i} today."


def test_concurrency_is_bounded_and_cached_calls_are_not_sent_again(tmp_path):
    reqs = word_requests(12)
    with FakeOpenAI(latency_s=0.05) as fake:
        asyncio.run(_answer_all(_client(fake, tmp_path, max_concurrency=3), reqs))
        assert fake.max_in_flight <= 3 and fake.outcomes["ok"] == 12
        again = _client(fake, tmp_path, max_concurrency=3)
        answers = asyncio.run(_answer_all(again, reqs + word_requests(2, tag="new")))
        assert fake.outcomes["ok"] == 14  # only the two new calls reached the server
    assert len(answers) == 14
    assert sum(r["cache_hit"] for r in again.records) == 12
    assert all(r["price_usd"] == 0 and r["prompt_tokens"] == 0 for r in again.records if r["cache_hit"])


def test_parse_target_is_tolerant():
    assert parse_target('{"target": "Hello there."}') == "Hello there."
    assert parse_target('Sure!\n```json\n{"target": "In a fence."}\n```') == "In a fence."
    assert parse_target('Here you go: {"target": "After a preamble."} Hope it helps') == "After a preamble."
    assert parse_target('"A bare JSON string."') == "A bare JSON string."
    assert parse_target("Target: plain text reply.") == "plain text reply."
    assert parse_target('{"target": "cut') is None
    assert parse_target('{"other": "field"}') is None
    assert parse_target("   ") is None


def test_call_key_is_model_messages_params_and_seed():
    msgs = [{"role": "user", "content": "hi"}]
    base = call_key("m", msgs, {"temperature": 0.7}, 1)
    assert base == call_key("m", [dict(m) for m in msgs], {"temperature": 0.7}, 1)
    variants = [call_key("m2", msgs, {"temperature": 0.7}, 1), call_key("m", [{"role": "user", "content": "ho"}],
                {"temperature": 0.7}, 1), call_key("m", msgs, {"temperature": 0.8}, 1),
                call_key("m", msgs, {"temperature": 0.7}, 2)]
    assert len({base, *variants}) == 5


def test_cache_journal_budget_and_orphans(tmp_path):
    cache = CallCache(tmp_path / "c.sqlite")
    inv = cache.start_invocation()
    cache.journal(inv, {"call_key": "a", "price_usd": 0.25, "status": "ok"})
    cache.journal(inv, {"call_key": "b", "price_usd": 0.5, "status": "truncated"})
    cache.put("a", "m", {"content": "x", "finish_reason": "stop", "usage": {}})
    assert cache.spent_on(["a", "b", "zzz"]) == 0.75 and cache.spent_on(["a"]) == 0.25
    later = cache.start_invocation()
    assert cache.adopt_orphans(later) == []  # `inv` is still running: its journal is not an orphan
    cache._commit("UPDATE invocations SET pid = ? WHERE invocation = ?", [2**22 + 12345, inv])  # its process died
    assert [r["call_key"] for r in cache.adopt_orphans(later)] == ["a", "b"]
    third = cache.start_invocation()
    assert cache.adopt_orphans(third) == []  # claimed by `later`, which is running
    cache.release_invocation(later)  # `later` fails and leaves its journal to a retry: the retry adopts both
    assert len(cache.adopt_orphans(third)) == 2
    cache.finish_invocation(third)  # handed to lineage: never adopted again
    assert cache.adopt_orphans(cache.start_invocation()) == []
    cache.close()
    reopened = CallCache(tmp_path / "c.sqlite")
    assert reopened.get("a")["content"] == "x" and reopened.get("b") is None


def test_prices():
    p = Price(input=1.0, cached_input=0.5, output=4.0, batch_input=0.5, batch_output=2.0)
    assert p.cost(1_000_000, 1_000_000, 400_000) == pytest.approx(0.6 * 1.0 + 0.4 * 0.5 + 4.0)
    assert p.cost(1_000_000, 0, 0, batch=True) == pytest.approx(0.5)
    assert p.worst_case(1000, 100) == pytest.approx((1000 * 1.0 + 100 * 4.0) / 1e6)
    assert resolve_price("gpt-4o-mini-2024-07-18") == resolve_price("gpt-4o-mini")
    assert resolve_price("my-local-model", free=True).free
    with pytest.raises(PriceError, match="corpus.teacher.price"):
        resolve_price("my-local-model")
    over = resolve_price("my-local-model", {"input": 2.0, "output": 3.0})
    assert (over.cached_input, over.batch_input, over.batch_output) == (2.0, 2.0, 3.0)


def test_profile_rejects_unpriced_model_and_pasted_keys(tmp_path):
    from tinymars.profile import ProfileError

    with pytest.raises(ProfileError, match="no price for 'mystery-model'"):
        make_profile("http://127.0.0.1:1/v1", model="mystery-model")
    assert make_profile("http://127.0.0.1:1/v1", model="mystery-model", free=True).corpus.teacher.free
    with pytest.raises(ProfileError) as info:
        make_profile("http://127.0.0.1:1/v1", api_key_env=FAKE_KEY)
    assert "NAME of an environment variable" in str(info.value) and FAKE_KEY not in str(info.value)


def test_api_key_from_env(monkeypatch):
    teacher = make_profile("http://u:p@127.0.0.1:1/v1?key=x").corpus.teacher
    monkeypatch.delenv("TINYMARS_TEST_TEACHER_KEY", raising=False)
    with pytest.raises(MissingKey, match="TINYMARS_TEST_TEACHER_KEY is not set"):
        api_key_from_env(teacher)
    monkeypatch.setenv("TINYMARS_TEST_TEACHER_KEY", FAKE_KEY)
    assert api_key_from_env(teacher) == FAKE_KEY
    assert public_endpoint(teacher.base_url) == "http://127.0.0.1:1/v1"


def test_budget_waits_for_calls_in_flight_then_stops():
    async def scenario() -> list[str]:
        budget, events = Budget(1.0, spent_before=0.1), []
        await budget.reserve(0.6)

        async def second() -> None:
            await budget.reserve(0.6)  # 0.1 + 0.6 + 0.6 > 1: waits for the first to settle
            events.append("second reserved")

        task = asyncio.create_task(second())
        await asyncio.sleep(0)
        events.append("first settles")
        await budget.settle(0.6, 0.05)
        await task
        await budget.settle(0.6, 0.7)  # spent: 0.1 + 0.05 + 0.7 = 0.85
        try:
            await budget.reserve(0.2)  # nothing in flight and 0.85 + 0.2 > 1
        except BudgetStop:
            events.append(f"stopped at {budget.spent:.2f}")
        return events

    assert asyncio.run(scenario()) == ["first settles", "second reserved", "stopped at 0.85"]


def test_rate_limiter_with_a_fake_clock():
    now = [0.0]

    async def sleep(s: float) -> None:
        now[0] += s

    async def scenario() -> tuple[float, float]:
        lim = RateLimiter(60, None, clock=lambda: now[0], sleep=sleep)
        for _ in range(60):  # a full bucket: a minute's requests at once
            await lim.acquire(10)
        t0 = now[0]
        await lim.acquire(10)  # the 61st waits for one request's refill (1 s at 60/min)
        rpm_wait = now[0] - t0
        tok = RateLimiter(None, 1000, clock=lambda: now[0], sleep=sleep)
        await tok.acquire(600)
        t1 = now[0]
        await tok.acquire(600)  # 400 left; 200 more refill in 12 s at 1000/min
        return rpm_wait, now[0] - t1

    rpm_wait, tpm_wait = asyncio.run(scenario())
    assert rpm_wait == pytest.approx(1.0) and tpm_wait == pytest.approx(12.0)


def test_retry_after_header_forms():
    assert retry_after_s({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert retry_after_s({"retry-after": "3"}) == 3.0
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    assert 25 <= retry_after_s({"retry-after": when}) <= 30
    assert retry_after_s({"retry-after": "soon"}) is None and retry_after_s({}) is None


def test_budget_stop_is_not_blocked_by_float_residue():
    """0.1 + 0.2 - 0.2 - 0.1 leaves 2.8e-17 'reserved': the stop must still come (this once hung a run)."""

    async def scenario() -> str:
        budget = Budget(0.3)
        await budget.reserve(0.1)
        await budget.reserve(0.2)
        await budget.settle(0.2, 0.0)
        await budget.settle(0.1, 0.29)
        try:
            await asyncio.wait_for(budget.reserve(0.05), timeout=5)
        except BudgetStop:
            return f"stopped, reserved {budget.reserved}"
        return "reserved"

    assert asyncio.run(scenario()) == "stopped, reserved 0.0"


def test_run_refuses_before_any_work_when_the_key_variable_is_unset(tmp_path, monkeypatch, capsys):
    import yaml

    from app.cli import main
    from tests.teacher_support import profile_data

    monkeypatch.delenv("TINYMARS_TEST_TEACHER_KEY", raising=False)
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(profile_data("http://127.0.0.1:9/v1")))
    assert main(["run", "--profile", str(path), "--home", str(tmp_path / "home")]) == 2
    err = capsys.readouterr().err
    assert "the environment variable TINYMARS_TEST_TEACHER_KEY is not set" in err
    assert not (tmp_path / "home").exists()


def test_refused_parameters_are_adapted_once_and_the_call_key_stays(tmp_path):
    reqs = word_requests(3)
    with FakeOpenAI(refuse={"max_tokens", "temperature"}) as fake:
        client = _client(fake, tmp_path, max_concurrency=1)
        answers = asyncio.run(_answer_all(client, reqs))
        assert fake.outcomes["400"] == 2 and fake.outcomes["ok"] == 3  # one 400 per refused parameter, then fine
    assert client.token_param == "max_completion_tokens" and not client.send_temperature
    assert len(answers) == 3 and all(r["call_key"] in {q.key for q in reqs} for r in client.records)


def test_a_retry_after_beyond_the_limit_stops_at_once(tmp_path):
    with FakeOpenAI(faults=["429"], retry_after_ms=600_000) as fake:
        client = _client(fake, tmp_path, max_retry_after_s=5)
        with pytest.raises(TeacherUnavailable) as info:
            asyncio.run(_answer_all(client, word_requests(1)))
        assert sum(fake.outcomes.values()) == 1
    assert info.value.final and "asks to wait 600s" in str(info.value)
    assert "max_retry_after_s" in str(info.value)


def test_profile_refuses_a_truncation_retry_that_is_not_longer():
    from tinymars.profile import ProfileError

    with pytest.raises(ProfileError, match=r"truncation_max_tokens: 64 is not above max_tokens \(64\)"):
        make_profile("http://127.0.0.1:1/v1", max_tokens=64, truncation_max_tokens=64)
    with pytest.raises(ProfileError, match="max_truncation_rate"):
        make_profile("http://127.0.0.1:1/v1", max_truncation_rate=1.5)
    teacher = make_profile("http://127.0.0.1:1/v1", max_tokens=64, truncation_max_tokens=65).corpus.teacher
    assert (teacher.truncation_max_tokens, teacher.max_truncation_rate) == (65, 0.2)
