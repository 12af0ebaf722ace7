"""The teacher inside the real iteration flow (Prefect harness, real CLI): a budget stop and a rejected
key fail the corpus stage cleanly and every paid call is in lineage. That the key is nowhere (files,
Prefect's database, output) is tests/test_secrets.py's job."""

from __future__ import annotations

import pytest
import yaml

from app.cli import main
from tests.openai_server import FakeOpenAI
from tests.teacher_support import FAKE_KEY, KEY_ENV, profile_data
from tinymars.lineage import Lineage

pytestmark = pytest.mark.slow
WRONG_KEY = "sk-test-WRONG-TINYMARS-3c4d5e6f7a8b"


def test_flow_budget_stop_and_rejected_key_leave_calls_in_lineage(prefect_harness, tmp_path, monkeypatch, capsys):
    home = tmp_path / "home"
    path = tmp_path / "teacher.yaml"
    with FakeOpenAI(api_key=FAKE_KEY) as fake:
        path.write_text(yaml.safe_dump(profile_data(fake.base_url, max_usd=0.002)))
        monkeypatch.setenv(KEY_ENV, FAKE_KEY)
        assert main(["run", "--profile", str(path), "--home", str(home)]) == 1
        answered = fake.outcomes["ok"]
        budget_err = capsys.readouterr().err
        monkeypatch.setenv(KEY_ENV, WRONG_KEY)  # and a budget with room left, so the key is what fails
        assert main(["run", "--profile", str(path), "--home", str(home), "--set", "corpus.teacher.max_usd=1"]) == 1
        auth_err = capsys.readouterr().err
        refused = fake.outcomes
    assert "run failed: BudgetExceeded: corpus.teacher.max_usd: budget $0.0020 reached" in budget_err
    assert "rejected the key in $TINYMARS_TEST_TEACHER_KEY" in auth_err and "401" in auth_err

    lin = Lineage(home / "lineage.duckdb")
    runs = sorted(lin.runs(), key=lambda r: r["started_at"])
    assert [r["status"] for r in runs] == ["failed", "failed"]
    budget_run, auth_run = runs[0]["run_id"], runs[1]["run_id"]
    stage = lin.stages(budget_run)
    assert [(s["stage"], s["status"]) for s in stage] == [("corpus", "failed")]
    assert "BudgetExceeded" in stage[0]["error"]
    calls = lin.query("SELECT status, price_usd, cache_hit FROM teacher_calls WHERE run_id = ?", [budget_run])
    assert sum(c["status"] == "ok" and not c["cache_hit"] for c in calls) == answered > 0  # the server's count
    assert 0 < sum(c["price_usd"] for c in calls) <= 0.002
    auth_calls = lin.query("SELECT status FROM teacher_calls WHERE run_id = ? AND NOT cache_hit", [auth_run])
    assert {c["status"] for c in auth_calls} == {"auth_error"} and len(auth_calls) == refused["401"] >= 1
    assert WRONG_KEY not in auth_err  # the server echoed it; the full scan is tests/test_secrets.py
