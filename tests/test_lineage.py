"""Lineage store: rows for runs, stages, artifacts, edges, metrics; concurrent writers lose nothing."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

from tinymars.lineage import Lineage
from tinymars.stages import ORDER, downstream


def _result(stage: str, h: str, inputs: dict[str, str], hit: bool = False) -> dict:
    return {
        "stage": stage, "name": stage, "key": f"key-{h}", "cache_hit": hit, "duration_s": 1.5,
        "artifact": {"stage": stage, "key": f"key-{h}", "path": f"/a/{h}", "content_hash": h,
                     "files": {"f": {"sha256": "x", "bytes": 10}, "g": {"sha256": "y", "bytes": 5}}, "rows": 7},
        "inputs": inputs, "metrics": [{"key": "loss", "value": 2.5}],
        "teacher_calls": [{"call_key": "c1", "model": "m", "prompt_tokens": 10, "completion_tokens": 5,
                           "price_usd": 0.001, "status": "ok", "attempt": 1, "cache_hit": False}],
    }


def _run(lin: Lineage, run_id: str) -> None:
    lin.start_run({"run_id": run_id, "profile_name": "tiny", "profile_hash": "ph", "profile_json": "{}",
                   "code_version": "cv", "git_sha": "abc", "git_dirty": True})


def test_rows_edges_and_queries(tmp_path):
    lin = Lineage(tmp_path / "l.duckdb")
    _run(lin, "run-1")
    lin.record_stage("run-1", _result("corpus", "aaa111", {}))
    lin.record_stage("run-1", _result("tokenizer", "bbb222", {"corpus": "aaa111"}))
    lin.record_stage("run-1", _result("pack", "ccc333", {"corpus": "aaa111", "tokenizer": "bbb222"}, hit=True))
    lin.finish_run("run-1", "completed")

    runs = lin.runs()
    assert len(runs) == 1 and runs[0]["status"] == "completed" and runs[0]["stages"] == 3
    assert runs[0]["cache_hits"] == 1 and runs[0]["git_dirty"] is True
    stages = lin.stages("run-1")
    assert [s["stage"] for s in stages] == ["corpus", "tokenizer", "pack"]
    assert lin.artifact("bbb222")["bytes"] == 15 and lin.artifact("bbb222")["rows"] == 7
    assert {p["content_hash"] for p in lin.parents("ccc333")} == {"aaa111", "bbb222"}
    assert {c["content_hash"] for c in lin.children("aaa111")} == {"bbb222", "ccc333"}
    assert lin.resolve("run-") == ("run", "run-1")
    assert lin.resolve("bbb") == ("artifact", "bbb222")
    assert len(lin.metrics("run-1")) == 3
    calls = lin.query("SELECT count(*) AS n, sum(prompt_tokens) AS p FROM teacher_calls")[0]
    assert calls == {"n": 3, "p": 30}


def test_same_artifact_twice_is_one_row(tmp_path):
    lin = Lineage(tmp_path / "l.duckdb")
    _run(lin, "r1")
    _run(lin, "r2")
    lin.record_stage("r1", _result("corpus", "aaa", {}))
    lin.record_stage("r2", _result("corpus", "aaa", {}, hit=True))
    assert lin.query("SELECT count(*) AS n FROM artifacts")[0]["n"] == 1
    assert lin.query("SELECT count(*) AS n FROM stages")[0]["n"] == 2


def _writer(path: str, worker: int, n: int) -> None:
    lin = Lineage(Path(path))
    _run(lin, f"w{worker}")
    for i in range(n):
        lin.record_stage(f"w{worker}", _result("eval", f"h{worker}-{i}", {}))
    lin.finish_run(f"w{worker}", "completed")


def test_two_processes_write_one_database(tmp_path):
    path = str(tmp_path / "l.duckdb")
    Lineage(path)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(path, w, 25)) for w in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    lin = Lineage(path)
    assert lin.query("SELECT count(*) AS n FROM stages")[0]["n"] == 50
    assert lin.query("SELECT count(*) AS n FROM runs WHERE status = 'completed'")[0]["n"] == 2


def test_downstream_closure():
    assert downstream(["tokenizer"]) == {"tokenizer", "replay", "pack", "train", "steer", "generate", "score",
                                         "report"}
    assert downstream(["replay"]) == {"replay", "train", "steer", "generate", "score", "report"}
    assert downstream(["score"]) == {"score", "report"}
    assert downstream(["eval"]) == {"generate", "score", "report"}  # the former stage: an alias for both
    assert downstream(["corpus"]) == set(ORDER)
    assert downstream([]) == set()
