"""Two (and three) runs at once on one home: the artifact store, the lineage database and the teacher
call cache are shared, and nothing may be lost, corrupted, paid twice or fail on a lock.

The runs are real processes (forked from tests/chaos_support.py's zygote, which has done the slow
imports once, each calling `tinymars run`), talking to the session's Prefect harness; the deployment
runs go through a real process worker on that same API. See ARCHITECTURE.md "Concurrent runs".
"""

from __future__ import annotations

import multiprocessing as mp
import re
import subprocess
import sys
import textwrap
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from deploy.local import LocalPrefect
from tests import chaos_support as cs
from tests.openai_server import FakeOpenAI
from tests.teacher_support import FAKE_KEY, profile_data, word_requests
from tinymars.artifacts import verify
from tinymars.lineage import Lineage, LineageLocked

pytestmark = pytest.mark.slow
ANSWERED = ("accepted", "rejected")
PROFILE = cs.PROFILE  # the smallest real profile: every stage, seconds of work
LOCK_TROUBLE = ("database is locked", "LineageLocked", "Conflicting lock", "Traceback")


@pytest.fixture(scope="module")
def zygote(prefect_harness):
    from prefect.settings import PREFECT_API_URL

    return cs.shared_zygote(PREFECT_API_URL.value())  # its runs have the test teacher's key


def _run_all(zygote: cs.Zygote, argvs: list[list[str]], logs: Path, home: Path) -> list[str]:
    """Start every run at once, wait for all; their outputs (each must exit 0 with no lock trouble).
    Meanwhile a reader queries the lineage database the way `tinymars runs` and `cost` do."""
    logs.mkdir(parents=True, exist_ok=True)
    pids = [zygote.spawn(argv, logs / f"run-{i}.log") for i, argv in enumerate(argvs)]
    done, reads, errors = threading.Event(), [], []

    def read() -> None:
        while not done.wait(0.25):
            try:
                if (home / "lineage.duckdb").exists():
                    lin = Lineage(home / "lineage.duckdb")
                    reads.append((lin.runs(), lin.query("SELECT count(*) AS n FROM teacher_calls")))
            except Exception as exc:  # noqa: BLE001 - collected and asserted on below
                errors.append(repr(exc))

    reader = threading.Thread(target=read)
    reader.start()
    try:
        codes = [zygote.wait(pid) for pid in pids]
    finally:
        done.set()
        reader.join()
    assert not errors and reads, errors
    texts = [(logs / f"run-{i}.log").read_text() for i in range(len(argvs))]
    for code, text in zip(codes, texts, strict=True):
        assert code == 0, text[-4000:]
        assert not [t for t in LOCK_TROUBLE if t in text], text[-4000:]
    return texts


def _printed_stages(text: str) -> tuple[str, list[str]]:
    """The run id and the stage names the CLI printed (whatever stages the flow has today)."""
    run_id = re.search(r"^run (\S+)$", text, re.M).group(1)
    after = text[text.index(f"\nrun {run_id}\n"):]
    return run_id, re.findall(r"^  (\S+)\s+(?:built|cache hit)\s", after, re.M)


@pytest.fixture(scope="module")
def three_runs(zygote, tmp_path_factory):
    """Two identical `tinymars run` and a third with an eval override, cold, on one home (the smallest real
    profile, every stage)."""
    home = tmp_path_factory.mktemp("concurrent") / "home"
    same = ["run", "--profile", PROFILE, "--home", str(home)]
    texts = _run_all(zygote, [same, same, [*same, "--set", "eval.max_new_tokens=8"]], home.parent / "logs", home)
    return home, [_printed_stages(t) for t in texts]


def test_three_cold_runs_on_one_home_all_complete_with_every_stage_row(three_runs):
    home, printed = three_runs
    lin = Lineage(home / "lineage.duckdb")
    assert len({run_id for run_id, _ in printed}) == 3
    for run_id, names in printed:
        assert names, "the CLI printed no stages"
        (run,) = [r for r in lin.runs() if r["run_id"] == run_id]
        assert run["status"] == "completed"
        stages = lin.stages(run_id)
        assert sorted(s["name"] for s in stages) == sorted(names)
        assert all(s["status"] == "completed" and s["artifact_hash"] for s in stages)
    total = lin.query("SELECT count(*) AS n FROM stages")[0]["n"]
    assert total == sum(len(names) for _, names in printed)  # no lost and no extra rows

    # every artifact any run recorded is in place and verifies against its manifest
    hashes = {r["artifact_hash"] for r in lin.query("SELECT artifact_hash FROM stages")}
    for h in hashes:
        assert verify(Path(lin.artifact(h)["path"])).content_hash == h
    builds = lin.query("SELECT max(n) AS n FROM (SELECT count(*) AS n FROM stages WHERE NOT cache_hit "
                       "GROUP BY cache_key)")[0]["n"]
    assert builds >= 2, "no key was built by two runs at once: the runs did not overlap"
    assert not list((home / "artifacts").glob("*/.tmp-*"))  # every losing build cleaned up after itself
    assert not list((home / "artifacts").glob("*/.corrupt-*"))  # and no race looked like corruption

    # the same profile gives the same keys and artifacts; the override changes some keys
    keys = [{s["name"]: (s["cache_key"], s["artifact_hash"]) for s in lin.query(
        "SELECT name, cache_key, artifact_hash FROM stages WHERE run_id = ?", [run_id])} for run_id, _ in printed]
    assert keys[0] == keys[1]
    assert keys[2] != keys[0] and set(keys[2]) == set(keys[0])


def test_two_teacher_runs_at_once_pay_for_each_call_once(zygote, tmp_path):
    home = tmp_path / "home"
    with FakeOpenAI(api_key=FAKE_KEY, latency_s=0.1, fault_rate=0.1, fault_mix=("429", "500", "malformed")) as fake:
        profile = tmp_path / "teacher.yaml"
        profile.write_text(yaml.safe_dump(profile_data(fake.base_url, max_concurrency=2, timeout_s=10.0)))
        argv = ["run", "--profile", str(profile), "--home", str(home), "--only", "corpus"]
        texts = _run_all(zygote, [argv, argv], tmp_path / "logs", home)
        billed, requests = fake.answered(), len(fake.log)
    assert billed and max(billed.values()) == 1  # no call paid twice
    assert sum(fake.outcomes[f] for f in ("429", "500", "malformed")) > 0  # faults were retried, too

    lin = Lineage(home / "lineage.duckdb")
    run_ids = [_printed_stages(t)[0] for t in texts]
    paid = {r: lin.query("SELECT call_key FROM teacher_calls WHERE run_id = ? AND NOT cache_hit AND status IN "
                         f"{ANSWERED}", [r]) for r in run_ids}
    corpus = [lin.query("SELECT * FROM stages WHERE run_id = ?", [r])[0] for r in run_ids]
    first, second = sorted(corpus, key=lambda s: s["started_at"])
    assert second["started_at"] < first["ended_at"], "the two corpus stages really overlapped"
    assert not any(s["cache_hit"] for s in corpus)  # both built it: neither found the other's artifact
    assert corpus[0]["artifact_hash"] == corpus[1]["artifact_hash"]
    paid_keys = [c["call_key"] for calls in paid.values() for c in calls]
    assert len(paid_keys) == len(set(paid_keys)) == sum(billed.values())  # lineage == the server's bill
    assert lin.query("SELECT count(*) AS n FROM teacher_calls WHERE NOT cache_hit")[0]["n"] == requests
    used = [{c["call_key"] for c in lin.query(  # each run accounts for every call it used, paid or not
        f"SELECT call_key FROM teacher_calls WHERE run_id = ? AND status IN {ANSWERED}", [r])} for r in run_ids]
    assert used[0] == used[1] == set(paid_keys)


def _answer_in_child(base_url: str, cache: str, out: str) -> None:
    import asyncio
    import json
    from types import SimpleNamespace

    from corpus.call_cache import CallCache
    from corpus.openai_teacher import TeacherClient
    from tinymars.prices import resolve_price

    settings = SimpleNamespace(
        base_url=base_url, model="gpt-4o-mini", api_key_env=None, max_concurrency=8, timeout_s=10.0,
        temperature=0.7, max_tokens=64, max_usd=None, requests_per_minute=None, tokens_per_minute=None,
        max_retries=2, backoff_s=0.01, backoff_max_s=0.05, max_retry_after_s=30.0, structured_output="auto")
    client = TeacherClient(settings, None, CallCache(cache), resolve_price("gpt-4o-mini"))

    async def go() -> dict:
        try:
            return await client.answer_all(word_requests(40, "lease"))
        finally:
            await client.close()

    answers = asyncio.run(go())
    Path(out).write_text(json.dumps({"answers": len(answers), "paid": client.counts["answered"]}))


def test_two_processes_on_one_call_cache_never_send_the_same_call_twice(tmp_path):
    """The call-cache lease on its own: two clients, same 40 calls, same time."""
    import json

    ctx = mp.get_context("spawn")
    with FakeOpenAI(latency_s=0.05) as fake:
        procs = [ctx.Process(target=_answer_in_child, args=(fake.base_url, str(tmp_path / "calls.sqlite"),
                                                            str(tmp_path / f"out{i}.json"))) for i in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(120)
        billed = fake.answered()
    assert [p.exitcode for p in procs] == [0, 0]
    outs = [json.loads((tmp_path / f"out{i}.json").read_text()) for i in range(2)]
    assert [o["answers"] for o in outs] == [40, 40]
    assert len(billed) == 40 and max(billed.values()) == 1
    assert sum(o["paid"] for o in outs) == 40


def test_two_deployment_runs_on_one_worker_both_complete_and_reach_lineage(three_runs, tmp_path):
    """On the home the cold runs left (so mostly verified cache hits): both runs' stage rows written at once."""
    from prefect.settings import PREFECT_API_URL

    from deploy.deployments import apply_deployments

    home, printed = three_runs
    apply_deployments(str(home), ["iteration"])
    local = LocalPrefect(tmp_path / "prefect-home", tmp_path / "logs", {"TINYMARS_HOME": str(home)},
                         api_url=PREFECT_API_URL.value())
    before = {r["run_id"] for r in Lineage(home / "lineage.duckdb").query("SELECT run_id FROM runs")}
    try:
        local.start_worker("tinymars-cpu")
        params = {"profile": PROFILE, "home": str(home)}
        with ThreadPoolExecutor(2) as pool:
            runs = list(pool.map(lambda _: local.run_deployment("iteration/iteration", params, 300), range(2)))
    finally:
        local.stop()
        assert all(p.poll() is not None for p in local.procs)
    assert [r["state"]["type"] for r in runs] == ["COMPLETED", "COMPLETED"], [r["state"] for r in runs]
    lin = Lineage(home / "lineage.duckdb")
    new = lin.query("SELECT run_id, status, prefect_flow_run_id FROM runs WHERE run_id NOT IN (SELECT unnest(?))",
                    [sorted(before)])
    assert sorted((r["prefect_flow_run_id"], r["status"]) for r in new) == sorted(
        (run["id"], "completed") for run in runs)
    # both ran the whole chain (cache hits, or rebuilds where the code changed since) to the same artifacts
    built = [{s["name"]: s["artifact_hash"] for s in lin.stages(run["run_id"]) if s["status"] == "completed"}
             for run in new]
    assert built[0] == built[1] and sorted(built[0]) == sorted(printed[0][1])
    for h in built[0].values():
        assert verify(Path(lin.artifact(h)["path"])).content_hash == h


def test_a_lock_that_never_frees_fails_with_the_file_named(tmp_path):
    """Bounded retry: a process holding the database open past the timeout gives LineageLocked naming it."""
    path = tmp_path / "lineage.duckdb"
    Lineage(path)
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, duckdb
        con = duckdb.connect({str(path)!r})
        print("holding", flush=True)
        sys.stdin.read()
    """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        with pytest.raises(LineageLocked, match=re.escape(str(path))):
            Lineage(path, lock_timeout_s=1.0)
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    lin = Lineage(path)  # freed: writes go through again
    lin.finish_run("nobody", "completed")
