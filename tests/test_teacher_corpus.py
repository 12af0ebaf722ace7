"""Corpus v2 through a teacher on a real loopback server: every row valid under faults, lineage equal
to the server's own counts, SIGKILL + rerun repeating nothing, the budget stop, rejects, the Batch API."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from corpus.openai_teacher import BudgetExceeded
from corpus.rows import ROW_FIELDS, preflight_register, preflight_selection, read_rows
from corpus.teacher_prompts import PromptError, load_templates
from corpus.template_teacher import generate_corpus
from scorers.register import register_score
from tasks.corpus import corpus_task
from tests.openai_server import FakeOpenAI
from tests.teacher_support import FAKE_KEY, KEY_ENV, ROOT, make_profile, profile_data, teacher_gate_off
from tinymars.lineage import Lineage

FAULTS = ["429", "500", "503", "timeout", "drop", "malformed", "html", "empty", "length"]
STATUS_OF = {"429": "rate_limited", "500": "server_error", "503": "server_error", "timeout": "timeout",
             "drop": "connection_error", "malformed": "malformed", "html": "malformed", "empty": "empty_choices",
             "length": "truncated"}
CALLS = 3 * 4 * 3 + 3 * (4 + 1) * 2  # selection: 3 caps x 4 prompts x 3 rows; register: 3 x (4 + 1 conflict) x 2


@pytest.fixture(autouse=True)
def _key(monkeypatch, no_teacher_gate):
    monkeypatch.setenv(KEY_ENV, FAKE_KEY)


def _corpus_file(result: dict) -> Path:
    return Path(result["artifact"]["path"]) / "corpus.jsonl"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> bytes:
    """corpus.jsonl of an uninterrupted, fault-free run."""
    with pytest.MonkeyPatch.context() as mp, FakeOpenAI() as fake:
        mp.setenv(KEY_ENV, FAKE_KEY)
        teacher_gate_off(mp)  # as no_teacher_gate does for each test
        result = corpus_task.fn(make_profile(fake.base_url), str(tmp_path_factory.mktemp("ref")))
    return _corpus_file(result).read_bytes()


def _assert_every_row_valid(rows: list[dict]) -> None:
    assert rows and all(set(r) == set(ROW_FIELDS) for r in rows)
    by_prompt: dict[str, list[dict]] = {}
    for r in rows:
        by_prompt.setdefault(r["prompt_id"], []).append(r)
        if r["kind"] == "selection":
            assert preflight_selection(r["items"], r["salient_item"], r["target"]), r["row_id"]
        else:
            sign = 1 if r["pole"] == "+" else -1
            assert register_score(r["target"], r["capability"]) * sign > 0, r["row_id"]
    for pid, group in by_prompt.items():
        assert len({r["split"] for r in group}) == 1, pid
        if group[0]["kind"] != "selection":
            pair = {r["pole"]: r["target"] for r in group}
            assert preflight_register(group[0]["capability"], pair["+"], pair["-"]), pid
        if group[0]["kind"] == "conflict":
            assert all(r["split"] == "heldout" and r["text_pole"] != r["pole"] for r in group)


def test_corpus_under_faults_has_every_row_valid_and_lineage_matches_the_server(tmp_path, reference):
    home = tmp_path / "home"
    # one truncation only: a call cut twice is rejected, not retried again (the corpus would differ)
    faults = FAULTS + [f for f in FAULTS if f != "length"]
    with FakeOpenAI(api_key=FAKE_KEY, faults=faults, timeout_sleep_s=0.8) as fake:
        result = corpus_task.fn(make_profile(fake.base_url, max_retries=8), str(home))
        outcomes, usage = Counter(fake.outcomes), list(fake.usage_sent)
        answered = fake.answered()
    Lineage(home / "lineage.duckdb").record_stage("run-faults", result)  # what the flow does with the hand-back
    rows = read_rows(_corpus_file(result))
    _assert_every_row_valid(rows)
    assert _corpus_file(result).read_bytes() == reference  # faults change nothing in the corpus
    assert outcomes["ok"] == CALLS and max(answered.values()) == 1
    lin = Lineage(home / "lineage.duckdb")
    by_status = {r["status"]: r["n"] for r in lin.query(
        "SELECT status, count(*) AS n FROM teacher_calls WHERE NOT cache_hit GROUP BY status")}
    assert by_status.pop("accepted") + by_status.pop("rejected", 0) == outcomes["ok"]
    expected = Counter()
    for outcome, n in outcomes.items():
        if outcome != "ok":
            expected[STATUS_OF[outcome]] += n
    assert by_status == dict(expected)
    tokens = lin.query("SELECT sum(prompt_tokens) AS p, sum(completion_tokens) AS c, sum(price_usd) AS usd "
                       "FROM teacher_calls")[0]
    assert tokens["p"] == sum(u["prompt_tokens"] for u in usage)
    assert tokens["c"] == sum(u["completion_tokens"] for u in usage)
    metrics = {m["key"]: m["value"] for m in lin.metrics("run-faults")}
    assert metrics["teacher_usd"] == pytest.approx(tokens["usd"], abs=1e-6) and metrics["rows"] == len(rows)
    stats = json.loads((Path(result["artifact"]["path"]) / "stats.json").read_text())
    assert stats["preflight"]["targets_checked"] == CALLS and stats["rows"] == len(rows)
    assert set(stats["target_chars"]) == {"memory", "identity", "continuity", "affect", "time", "ethics"}


def test_selection_prompts_are_the_template_teachers(reference):
    """The teacher reuses the template teacher's pools and random streams: same seed, same prompts."""
    rows = [json.loads(line) for line in reference.decode().splitlines()]
    template, _ = generate_corpus(["memory", "identity", "continuity"], 4, 1, 0.25, seed=3)
    mine = {r["prompt_id"]: r["prompt"] for r in rows if r["kind"] == "selection"}
    theirs = {r["prompt_id"]: r["prompt"] for r in template}
    assert mine == {k: v for k, v in theirs.items() if k in mine} and len(mine) == 12


DRIVER = """
import json, sys
sys.path.insert(0, {root!r})
from tasks.corpus import corpus_task
from tinymars.profile import validate_profile
corpus_task.fn(validate_profile(json.load(open(sys.argv[1]))), sys.argv[2])
"""


def _spawn(tmp_path: Path, data: dict, home: Path) -> subprocess.Popen:
    (tmp_path / "driver.py").write_text(DRIVER.format(root=str(ROOT)))
    (tmp_path / "profile.json").write_text(json.dumps(data))
    env = {**os.environ, KEY_ENV: FAKE_KEY}
    return subprocess.Popen([sys.executable, str(tmp_path / "driver.py"), str(tmp_path / "profile.json"), str(home)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _wait_for(condition, proc: subprocess.Popen, what: str, timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the corpus subprocess ended or stalled before {what}")
        time.sleep(0.005)


def _stored_keys(home: Path) -> set[str]:
    from corpus.call_cache import CallCache

    cache = CallCache(home / "teacher-cache" / "calls.sqlite")
    try:
        return cache.keys()
    finally:
        cache.close()


def test_sigkill_mid_generation_then_rerun_repeats_no_answered_call(tmp_path, reference):
    from tinymars.profile import validate_profile

    home = tmp_path / "home"
    with FakeOpenAI(latency_s=0.03) as fake:
        data = profile_data(fake.base_url)
        proc = _spawn(tmp_path, data, home)
        try:
            _wait_for(lambda: fake.outcomes["ok"] >= 25, proc, "25 answers")
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        assert proc.returncode == -signal.SIGKILL
        answered_before = {e["key"] for e in fake.log if e["outcome"] == "ok"}
        sent_before = len(fake.log)
        stored = _stored_keys(home)
        assert 0 < len(stored) < CALLS  # killed mid-generation, answers safely stored
        result = corpus_task.fn(validate_profile(data), str(home))
        asked_after = [e["key"] for e in fake.log[sent_before:]]
    repeated = answered_before & set(asked_after)
    # every call whose answer was stored is never asked again; only the kill's in-flight calls are
    assert len(repeated) == len(answered_before) - len(stored) <= 4
    assert len(asked_after) == len(set(asked_after)) == CALLS - len(stored)
    assert _corpus_file(result).read_bytes() == reference
    adopted = [c for c in result["teacher_calls"] if "interrupted run" in (c["error"] or "")]
    assert len(adopted) == len(stored)  # the killed run's paid calls reach lineage with the rerun
    assert sum(c["cache_hit"] for c in result["teacher_calls"]) == len(stored)


def test_budget_stops_before_it_is_exceeded_and_a_higher_budget_continues(tmp_path, reference):
    home = tmp_path / "home"
    with FakeOpenAI() as fake:
        with pytest.raises(BudgetExceeded) as info:
            corpus_task.fn(make_profile(fake.base_url, max_usd=0.002), str(home))
        first_answers = fake.outcomes["ok"]
        spent = sum(c["price_usd"] for c in info.value.teacher_calls)
        assert 0 < spent <= 0.002 and 0 < first_answers < CALLS
        assert len([c for c in info.value.teacher_calls if c["status"] == "ok"]) == first_answers
        message = str(info.value)
        assert "corpus.teacher.max_usd" in message and "raise corpus.teacher.max_usd and rerun" in message
        # the same budget again: what earlier runs spent counts, so nothing more is spent
        with pytest.raises(BudgetExceeded):
            corpus_task.fn(make_profile(fake.base_url, max_usd=0.002), str(home))
        assert fake.outcomes["ok"] == first_answers
        result = corpus_task.fn(make_profile(fake.base_url, max_usd=1.0), str(home))
        assert max(fake.answered().values()) == 1 and fake.outcomes["ok"] == CALLS
    assert _corpus_file(result).read_bytes() == reference
    fresh = [c for c in result["teacher_calls"] if not c["cache_hit"]]
    assert len(fresh) == CALLS - first_answers


def test_rejected_targets_are_resampled_counted_and_priced(tmp_path):
    def bad_first_sample(key: str, body: dict) -> str | None:
        return "bad" if body["seed"] % 100 == 0 and int(key, 16) % 4 == 0 else None

    with FakeOpenAI(fault_fn=bad_first_sample) as fake:
        result = corpus_task.fn(make_profile(fake.base_url, resamples=1), str(tmp_path / "a"))
        bad = fake.outcomes["bad"]
        no_resample = corpus_task.fn(make_profile(fake.base_url, resamples=0), str(tmp_path / "b"))
    assert bad > 0
    rows = read_rows(_corpus_file(result))
    _assert_every_row_valid(rows)
    _assert_every_row_valid(read_rows(_corpus_file(no_resample)))
    stats = result["artifact"]["meta"]["stats"]
    assert stats["preflight"]["targets_rejected"] == bad == stats["preflight"]["targets_checked"] - CALLS
    assert stats["rejected"] == dict.fromkeys(stats["rejected"], 0)  # every rejected target was resampled
    rejected_calls = [c for c in result["teacher_calls"] if c["status"] == "rejected"]
    assert len(rejected_calls) == bad and all(c["price_usd"] > 0 and c["error"] for c in rejected_calls)
    assert result["artifact"]["meta"]["teacher"]["teacher_usd_rejected"] == pytest.approx(
        sum(c["price_usd"] for c in rejected_calls), abs=1e-6)
    reasons = Counter(c["error"] for c in rejected_calls)  # the same counts, by reason, as lineage metrics
    metrics = {m["key"]: m["value"] for m in result["metrics"]}
    assert {k: metrics[f"rejected_{k}"] for k in reasons} == dict(reasons)
    dropped = sum(no_resample["artifact"]["meta"]["stats"]["rejected"].values())
    assert 0 < dropped <= bad  # without resampling, the prompts with a bad target are dropped whole
    assert len(read_rows(_corpus_file(no_resample))) < len(rows)


def test_batch_api_completes_and_a_rerun_resumes_polling(tmp_path, reference):
    home = tmp_path / "home"
    with FakeOpenAI(batch_polls=2) as fake:
        fake.hold_batches.set()  # the job stays in progress until the test lets it finish
        data = profile_data(fake.base_url, batch=True, batch_poll_s=0.02)
        proc = _spawn(tmp_path, data, home)
        try:
            _wait_for(lambda: any(b["polls"] >= 2 for b in fake.batches.values()), proc, "a batch is polled")
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        assert len(fake.batches) == 1
        fake.hold_batches.clear()
        from tinymars.profile import validate_profile

        result = corpus_task.fn(validate_profile(data), str(home))
        assert len(fake.batches) == 1  # resumed, not resubmitted
        assert fake.batch_outcomes["ok"] == CALLS and fake.outcomes["ok"] == 0
    assert _corpus_file(result).read_bytes() == reference
    calls = result["teacher_calls"]
    assert sum(c["status"] == "accepted" and not c["cache_hit"] for c in calls) == CALLS
    one = next(c for c in calls if c["status"] == "accepted")  # batch rates: $0.075 in, $0.30 out per 1M
    by_hand = ((one["prompt_tokens"] - one["cached_tokens"]) * 0.075 + one["cached_tokens"] * 0.0375
               + one["completion_tokens"] * 0.30) / 1e6
    assert one["price_usd"] == pytest.approx(by_hand, rel=1e-9)


def test_batch_items_that_fail_go_into_a_second_batch(tmp_path):
    with FakeOpenAI(batch_item_faults=3) as fake:
        result = corpus_task.fn(make_profile(fake.base_url, batch=True, batch_poll_s=0.01), str(tmp_path))
        assert len(fake.batches) == 2 and fake.batch_outcomes["500"] == 3
    _assert_every_row_valid(read_rows(_corpus_file(result)))
    assert sum(c["status"] == "batch_item_error" for c in result["teacher_calls"]) == 3
    assert sum(c["status"] == "batch_submitted" for c in result["teacher_calls"]) == 2


def test_prompt_templates_are_files_a_profile_can_override(tmp_path):
    shipped = load_templates()
    assert {"system", "memory", "identity", "continuity", "register", "conflict"} <= set(shipped.texts)
    (tmp_path / "memory.txt").write_text("Reply about {salient}. Mention at least one of these words: {keys}.\n"
                                         "Do not use any of these words: {avoid}.")
    custom = load_templates(tmp_path)
    assert custom.texts["memory"] != shipped.texts["memory"] and custom.texts["register"] == shipped.texts["register"]
    assert custom.digest != shipped.digest
    (tmp_path / "identity.txt").write_text("Speak as {persona}.")
    with pytest.raises(PromptError, match=r"identity.txt: unknown field\(s\) \{persona\}"):
        load_templates(tmp_path)


def test_a_retried_stage_hands_the_failed_attempts_calls_to_the_retry(tmp_path):
    """Only the last attempt's calls reach lineage, so a failed attempt that will be retried leaves its
    journal to the retry (and one that will not hands its calls over with the error)."""
    from corpus.openai_teacher import TeacherUnavailable
    from corpus.teacher_corpus import generate_teacher_corpus

    for will_retry in (True, False):
        failing = iter(["500", "500"])
        with FakeOpenAI(fault_fn=lambda key, body, f=failing: next(f, None)) as fake:
            section = make_profile(fake.base_url, max_retries=1, max_concurrency=1).corpus
            cache_dir = tmp_path / str(will_retry)
            with pytest.raises(TeacherUnavailable) as info:
                generate_teacher_corpus(section, cache_dir, FAKE_KEY, log=lambda m: None,
                                        will_retry=lambda exc, r=will_retry: r)
            failed = info.value.teacher_calls
            assert [c["status"] for c in failed] == ["server_error", "server_error"]
            result = generate_teacher_corpus(section, cache_dir, FAKE_KEY, log=lambda m: None)
        adopted = [c for c in result.teacher_calls if "interrupted run" in (c["error"] or "")]
        assert len(adopted) == (2 if will_retry else 0)


def test_stage_key_ignores_transport_and_money_but_not_what_shapes_rows():
    from tasks.corpus import key_section

    base = key_section(make_profile("http://127.0.0.1:1/v1"))
    same = make_profile("http://elsewhere:2/v1", max_concurrency=2, max_usd=5, timeout_s=9, batch=True,
                        requests_per_minute=10, structured_output="off")
    assert key_section(same) == base  # a finished corpus is never rebuilt (re-paid) for these
    for changed in ({"temperature": 0.1}, {"model": "gpt-4o"}, {"resamples": 0}, {"max_tokens": 99}):
        assert key_section(make_profile("http://127.0.0.1:1/v1", **changed)) != base, changed


def test_preflight_reasons_for_each_kind_of_bad_target():
    from corpus.openai_teacher import TeacherAnswer
    from corpus.teacher_corpus import check_target, plan_corpus, prompt_reject

    plan = plan_corpus(["memory", "affect"], 1, 0, seed=3, templates=load_templates(), heldout_fraction=0.25)
    memory, affect = plan[0], plan[1]
    slot = memory.slots[0]
    salient, other = memory.items[0]["keys"][0], memory.items[1]["keys"][0]

    def verdict(prompt, s, content, finish="stop"):
        return check_target(prompt, s, TeacherAnswer(json.dumps({"target": content}), finish))[1]

    assert verdict(memory, slot, f"Think of {salient} today.") is None
    assert verdict(memory, slot, f"Think of {salient} and {other}.") == "names_another_item"
    assert verdict(memory, slot, "Think of something nice.") == "salient_not_named"
    assert verdict(memory, slot, f"{salient}", finish="length") == "truncated"
    assert verdict(memory, slot, "", finish="content_filter") == "content_filter"
    assert check_target(memory, slot, TeacherAnswer('{"target": "cut', "stop"))[1] == "unparseable"
    plus, minus = affect.slots
    assert verdict(affect, plus, "So glad to help, what a lovely plan!") is None
    assert verdict(affect, plus, "Sigh, tedious and dull.") == "wrong_register"
    assert verdict(affect, minus, "Sigh, tedious and dull.") is None
    # each pole passes its own sign, but VADER reads the cold one as warmer: the pair is rejected
    warm, cold = "Glad to help.", "Sigh, dull, yet super amazing, superb and excellent!"
    assert verdict(affect, plus, warm) is None and verdict(affect, minus, cold) is None
    assert prompt_reject(affect, {"+": warm, "-": cold}) == "vader_disagrees"
    assert prompt_reject(affect, {"+": "So glad to help, lovely!", "-": "Sigh, tedious and dull."}) is None
