"""`tinymars cost`: the audit from lineage (checked against hand-computed sums) and the estimate before a
run (checked against what the run then really costs on the loopback server)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from app.cli import main
from tasks.corpus import corpus_task
from tests.openai_server import FakeOpenAI
from tests.teacher_support import FAKE_KEY, KEY_ENV, make_profile, profile_data
from tinymars.lineage import Lineage

CALLS = 66  # tiny-sized teacher corpus: 3 x 4 x 3 selection + 3 x (4 + 1) x 2 register/conflict rows


def _call(key: str, capability: str, status: str, usd: float, cache_hit: bool = False) -> dict:
    tokens = 0 if cache_hit else 100
    return {"call_key": key, "capability": capability, "model": "gpt-4o-mini", "endpoint": "http://x/v1",
            "prompt_tokens": tokens, "completion_tokens": tokens // 4, "cached_tokens": 0, "reasoning_tokens": 0,
            "price_usd": usd, "latency_s": 0.1, "status": status, "attempt": 0 if cache_hit else 1,
            "cache_hit": cache_hit, "error": None}


def _stage(status: str, calls: list[dict]) -> dict:
    return {"stage": "corpus", "name": "corpus", "status": status, "duration_s": 1.0, "teacher_calls": calls,
            "error": "BudgetExceeded: ..." if status == "failed" else None}


@pytest.fixture
def audited_home(tmp_path: Path) -> Path:
    """Run A stops on its budget after paying for k1 (answered), a 429 and a truncated answer; run B reuses
    k1 from the cache and pays for k4 (accepted), k5 (rejected by pre-flight) and k6 (accepted)."""
    lin = Lineage(tmp_path / "lineage.duckdb")
    for run in ("run-a", "run-b"):
        lin.start_run({"run_id": run, "profile_name": "p", "profile_hash": "h", "profile_json": "{}",
                       "code_version": "c"})
    lin.record_stage("run-a", _stage("failed", [
        _call("k1", "memory", "ok", 0.01), _call("k2", "affect", "rate_limited", 0.0),
        _call("k3", "affect", "truncated", 0.002)]))
    lin.record_stage("run-b", _stage("completed", [
        _call("k1", "memory", "accepted", 0.0, cache_hit=True), _call("k4", "memory", "accepted", 0.02),
        _call("k5", "affect", "rejected", 0.005), _call("k6", "affect", "accepted", 0.01)]))
    return tmp_path


def test_audit_totals_and_groups_by_hand(audited_home, capsys):
    assert main(["cost", "--home", str(audited_home), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    total = report["total"]
    assert (total["calls"], total["cache_hits"], total["failed_attempts"]) == (6, 1, 2)
    assert (total["accepted_rows"], total["rejected_targets"]) == (3, 1)  # k1 (paid in run A), k4, k6
    assert total["usd"] == pytest.approx(0.047)
    assert total["usd_rejected"] == pytest.approx(0.005) and total["usd_failed"] == pytest.approx(0.002)
    assert total["usd_per_accepted_row"] == pytest.approx(0.047 / 3)
    assert total["prompt_tokens"] == 600 and total["completion_tokens"] == 150
    by_stage = {r["stage"]: r["usd"] for r in report["by_stage"]}
    assert by_stage == {"corpus (failed)": pytest.approx(0.012), "corpus (completed)": pytest.approx(0.035)}
    by_cap = {r["capability"]: r for r in report["by_capability"]}
    assert by_cap["memory"]["usd"] == pytest.approx(0.03) and by_cap["memory"]["accepted_rows"] == 2
    assert by_cap["affect"]["usd_per_accepted_row"] == pytest.approx(0.017)
    assert {r["run"]: r["usd"] for r in report["by_run"]} == {"run-a": pytest.approx(0.012),
                                                            "run-b": pytest.approx(0.035)}
    assert [r["model"] for r in report["by_model"]] == ["gpt-4o-mini"]


def test_audit_of_one_run_as_text(audited_home, capsys):
    assert main(["cost", "--home", str(audited_home), "--run", "run-a", "--by", "capability"]) == 0
    out = capsys.readouterr().out
    assert "run run-a" in out and "by capability" in out and "by stage" not in out
    assert "0.012" in out and "0.047" not in out
    assert main(["cost", "--home", str(audited_home / "nowhere")]) == 2
    assert "no lineage database" in capsys.readouterr().err


def test_estimate_before_a_run_bounds_what_it_costs(tmp_path, monkeypatch, capsys, no_teacher_gate):
    monkeypatch.setenv(KEY_ENV, FAKE_KEY)
    home = tmp_path / "home"
    with FakeOpenAI() as fake:
        path = tmp_path / "p.yaml"
        path.write_text(yaml.safe_dump(profile_data(fake.base_url, max_usd=0.5)))
        assert main(["cost", "--estimate", "--profile", str(path), "--home", str(home), "--json"]) == 0
        before = json.loads(capsys.readouterr().out)
        assert fake.outcomes == {}  # an estimate sends nothing
        result = corpus_task.fn(make_profile(fake.base_url, max_usd=0.5), str(home))
        assert main(["cost", "--estimate", "--profile", str(path), "--home", str(home), "--json"]) == 0
        after = json.loads(capsys.readouterr().out)
        assert main(["cost", "--estimate", "--profile", str(path), "--home", str(home)]) == 0
        text = capsys.readouterr().out
    spent = sum(c["price_usd"] for c in result["teacher_calls"])
    t = before["total"]
    assert t["calls"] == CALLS and t["cached"] == 0
    assert 0 < t["expected_usd"] < t["worst_usd"] and spent <= t["worst_usd"]
    assert 0.5 < spent / t["expected_usd"] < 2.0
    assert t["worst_usd_with_resamples"] == pytest.approx(2 * t["worst_usd"])
    assert after["total"]["cached"] == CALLS and after["total"]["expected_usd"] == 0
    assert after["spent_so_far_usd"] == pytest.approx(spent)
    assert "budget corpus.teacher.max_usd $0.5" in text and "fits" in text
    assert main(["cost", "--estimate", "--profile", str(path), "--set", "corpus.teacher.batch=true", "--json"]) == 0
    batch = json.loads(capsys.readouterr().out)["total"]  # gpt-4o-mini's batch rates are half the online ones
    assert batch["expected_usd"] == pytest.approx(t["expected_usd"] / 2)


def test_estimate_for_the_template_teacher_is_free(capsys):
    assert main(["cost", "--estimate", "--profile", "tiny"]) == 0
    assert "offline and free: $0" in capsys.readouterr().out
    assert main(["cost", "--estimate"]) == 2
