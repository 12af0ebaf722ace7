"""The whole chain under a Prefect test harness with the `tiny` profile: real stages, real caching."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from app.cli import main
from tests.chaos_support import copy_home
from tinymars.lineage import Lineage

pytestmark = pytest.mark.slow

ALL = ["corpus", "channels", "tokenizer", "pack", "train:native", "train:baseline", "steer", "generate", "score",
       "report"]


@pytest.fixture(scope="module")
def chain(tiny_reference, tmp_path_factory):
    """A copy of the session's one cold tiny run through the real CLI; the tests below build on it."""
    return copy_home(tiny_reference, tmp_path_factory.mktemp("flow") / "home")


def _iterate(home: Path, **kw):
    from flows.iteration import iteration

    return iteration(profile="tiny", home=str(home), **kw)


def _built(out: dict) -> list[str]:
    return [s["name"] for s in out["stages"] if not s["cache_hit"]]


def test_cold_run_builds_every_stage_and_records_lineage(chain):
    lin = Lineage(chain / "lineage.duckdb")
    runs = lin.runs()
    assert len(runs) == 1 and runs[0]["status"] == "completed" and runs[0]["cache_hits"] == 0
    stages = lin.stages(runs[0]["run_id"])
    assert [s["name"] for s in stages] == ALL
    assert all(s["status"] == "completed" and s["artifact_hash"] for s in stages)
    arts = {a["name"]: a for a in lin.query("SELECT * FROM artifacts")}
    assert set(arts) == set(ALL)
    assert all(a["bytes"] > 0 for a in arts.values())
    assert arts["corpus"]["rows"] > 0
    report = arts["report"]["content_hash"]
    parents = {p["name"] for p in lin.parents(report)}
    assert parents == {"corpus", "pack", "score", "steer", "train:native", "train:baseline"}
    assert {c["name"] for c in lin.children(arts["tokenizer"]["content_hash"])} == {"pack", "steer", "generate"}
    assert {p["name"] for p in lin.parents(arts["score"]["content_hash"])} == {"generate"}
    keys = {m["key"] for m in lin.metrics(runs[0]["run_id"])}
    assert {"rows", "num_params", "vocab_size"} <= keys


def test_report_and_generations_are_complete(chain):
    lin = Lineage(chain / "lineage.duckdb")
    arts = {a["name"]: a for a in lin.query("SELECT * FROM artifacts")}
    report = (Path(arts["report"]["path"]) / "report.md").read_text()
    for heading in ("## Corpus", "## Models", "## Hypotheses (pre-registered)", "## Evaluation: MARS vs ABLATED",
                    "## Channel vs text", "## Persistence", "## Relief valve", "## Gates"):
        assert heading in report
    for cap in ("memory", "identity", "continuity", "affect", "time", "ethics"):
        assert cap in report
    gen_dir, score_dir = Path(arts["generate"]["path"]), Path(arts["score"]["path"])
    assert sorted(p.name for p in gen_dir.iterdir()) == ["generations.jsonl", "manifest.json", "measurements.json"]
    records = [json.loads(line) for line in (gen_dir / "generations.jsonl").read_text().splitlines()]
    assert {r["arm"] for r in records if r.get("turn", 0) == 0} == {"mars", "ablated", "text"}  # + follow-up arms
    assert all({"row_id", "prompt", "response", "channel_state", "response_tokens"} <= set(r) for r in records)
    # every verdict can be re-scored with no model: the saved scores are a pure function of the JSONL
    from scorers.evaluate import score_all

    scores = json.loads((score_dir / "scores.json").read_text())
    settings = json.loads((score_dir / "settings.json").read_text())
    measured = json.loads((gen_dir / "measurements.json").read_text())
    assert score_all(records, settings, measured) == scores


def test_rerun_recomputes_nothing(chain):
    out = _iterate(chain)
    assert _built(out) == []
    lin = Lineage(chain / "lineage.duckdb")
    stages = lin.stages(out["run_id"])
    assert len(stages) == len(ALL) and all(s["cache_hit"] for s in stages)


def test_decoding_change_regenerates_then_rescores_and_reports(chain):
    out = _iterate(chain, overrides=["eval.max_new_tokens=6"])
    assert _built(out) == ["generate", "score", "report"]


def test_refresh_tokenizer_reruns_it_and_downstream_only(chain):
    out = _iterate(chain, refresh=["tokenizer"])
    assert _built(out) == ["tokenizer", "pack", "train:native", "train:baseline", "steer", "generate", "score",
                           "report"]


def test_corrupt_artifact_is_rebuilt_with_a_warning(chain, caplog):
    lin = Lineage(chain / "lineage.duckdb")
    pack = lin.query("SELECT path FROM artifacts WHERE name = 'pack' ORDER BY created_at DESC LIMIT 1")[0]
    shard = sorted(Path(pack["path"]).glob("train-*.parquet"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        out = _iterate(chain)
    assert "no longer matches its manifest" in caplog.text and shard.name in caplog.text
    # the pack is rebuilt byte-identically, so nothing downstream needs to run again
    assert _built(out) == ["pack"]


def test_cli_runs_and_lineage_commands(chain, capsys):
    assert main(["runs", "--home", str(chain), "--json"]) == 0
    runs = json.loads(capsys.readouterr().out)
    assert len(runs) >= 1 and runs[-1]["profile_name"] == "tiny"
    run_id = runs[-1]["run_id"]
    assert main(["lineage", run_id[:18], "--home", str(chain)]) == 0
    text = capsys.readouterr().out
    assert f"run {run_id}" in text and "train:native" in text
    lin = Lineage(chain / "lineage.duckdb")
    h = lin.query("SELECT content_hash FROM artifacts WHERE name = 'tokenizer' LIMIT 1")[0]["content_hash"]
    assert main(["lineage", h[:10], "--home", str(chain)]) == 0
    text = capsys.readouterr().out
    assert "parents:" in text and "corpus" in text and "children:" in text and "pack" in text
    assert main(["lineage", "zzzz", "--home", str(chain)]) == 2


def test_only_stops_after_the_stage(chain, capsys):
    assert main(["run", "--profile", "tiny", "--home", str(chain), "--only", "tokenizer"]) == 0
    out = capsys.readouterr().out
    assert "stopped after tokenizer (--only)" in out
    lin = Lineage(chain / "lineage.duckdb")
    run_id = lin.runs(1)[0]["run_id"]
    assert [s["name"] for s in lin.stages(run_id)] == ["corpus", "channels", "tokenizer"]
    assert lin.runs(1)[0]["status"] == "completed"


def test_report_command_prints_the_latest_report(chain, capsys):
    assert main(["report", "--home", str(chain)]) == 0
    assert "## Evaluation: MARS vs ABLATED" in capsys.readouterr().out
    assert main(["report", "--home", str(chain), "--path"]) == 0
    assert capsys.readouterr().out.strip().endswith("report.md")
    assert main(["report", "nope", "--home", str(chain)]) == 2
