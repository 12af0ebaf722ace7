"""The teacher corpus under load: 10,005 calls against the loopback server with 5% injected faults.

Runs the corpus stage's domain code in-process (`corpus_task.fn`, no CLI or Prefect start-up: the
calls are the load), the server in its own process. Every row must pass pre-flight again, and the
three ledgers must agree exactly: the server's request log, lineage `teacher_calls`, the corpus rows.
Wall time and memory are printed by bench/load.py, not asserted here.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from corpus.rows import read_rows
from tests.teacher_support import FAKE_KEY, KEY_ENV, ROOT, load_calls
from tests.test_teacher_corpus import STATUS_OF, _assert_every_row_valid
from tinymars.lineage import Lineage

pytestmark = pytest.mark.slow


@pytest.mark.usefixtures("no_teacher_gate")  # no shared Prefect limit in-process
def test_ten_thousand_calls_with_five_percent_faults_complete_with_exact_ledgers(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    from load import run_load

    monkeypatch.setenv(KEY_ENV, FAKE_KEY)
    out = run_load(tmp_path / "home")
    assert out["calls"] == load_calls() >= 10_000
    outcomes = Counter(out["outcomes"])
    faults = sum(n for k, n in outcomes.items() if k != "ok")
    assert {"429", "500", "timeout", "malformed"} <= set(outcomes)
    assert 0.03 < faults / out["requests"] < 0.07  # the 5% asked for (a hash draw, so not exactly)

    # the server billed every call exactly once, and nothing else
    assert out["billed"] == outcomes["ok"] == out["calls"] and out["max_per_key"] == 1

    rows = read_rows(Path(out["result"]["artifact"]["path"]) / "corpus.jsonl")
    _assert_every_row_valid(rows)
    assert len(rows) == out["rows"] == out["calls"]  # the server writes targets that pass pre-flight

    lin = Lineage(tmp_path / "home" / "lineage.duckdb")
    by_status = {r["status"]: r["n"] for r in lin.query(
        "SELECT status, count(*) AS n FROM teacher_calls WHERE NOT cache_hit GROUP BY status")}
    assert by_status.pop("accepted") == out["calls"] and by_status.pop("rejected", 0) == 0
    expected = Counter()
    for outcome, n in outcomes.items():
        if outcome != "ok":
            expected[STATUS_OF[outcome]] += n
    assert by_status == dict(expected)  # every failed attempt is a row with the server's outcome
    assert lin.query("SELECT count(*) AS n FROM teacher_calls")[0]["n"] == out["requests"]
    assert lin.query("SELECT count(DISTINCT call_key) AS n FROM teacher_calls WHERE status = 'accepted'")[0]["n"] \
        == len({r["row_id"] for r in rows})
