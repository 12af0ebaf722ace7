"""`tinymars lineage --openlineage`: the session's tiny run exported as OpenLineage events, to a file and over HTTP.

Validation: openlineage-python 1.54.0 ships no JSON schema (only classes generated from it, which name
their schema URLs). tests/data/openlineage/ holds the spec files those URLs name, copied from the
OpenLineage repository (github.com/OpenLineage/OpenLineage, spec/OpenLineage.json and spec/facets/*.json
at commit 8f02abfb7a25); `test_vendored_schemas_are_the_ones_the_client_names` checks that each file's
$id is the URL the installed client writes into `schemaURL` / `_schemaURL`, so a client upgrade that
moves to a new spec version fails here until the files are refreshed. Every event is validated against
OpenLineage.json's RunEvent (2-0-2) with format checks (uuid, date-time), and every standard facet
against its own facet schema; our `tinymars_*` facets are checked against the core RunFacet/DatasetFacet.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import duckdb
import jsonschema
import pytest
from referencing import Registry, Resource

from app.cli import main
from tests.chaos_support import copy_home
from tinymars.stages import PARENTS

SPEC = Path(__file__).parent / "data" / "openlineage"
EVENT_SCHEMA = "https://openlineage.io/spec/2-0-2/OpenLineage.json#/$defs/RunEvent"


# ------------------------------------------------------------------ helpers
@pytest.fixture(scope="module")
def registry() -> Registry:
    resources = [Resource.from_contents(json.loads(p.read_text())) for p in sorted(SPEC.glob("*.json"))]
    return Registry().with_resources((r.id(), r) for r in resources)


def _validator(registry: Registry, url: str) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator({"$ref": url}, registry=registry,
                                           format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)


def _facets(event: dict[str, Any]) -> list[dict[str, Any]]:
    """Every facet of an event: run, job, dataset, input and output facets (nested root/parent excluded)."""
    found = [*event["run"].get("facets", {}).values(), *event["job"].get("facets", {}).values()]
    for ds in event.get("inputs", []) + event.get("outputs", []):
        found += [*ds.get("facets", {}).values(), *ds.get("inputFacets", {}).values(),
                  *ds.get("outputFacets", {}).values()]
    return found


def schema_errors(registry: Registry, event: dict[str, Any]) -> list[str]:
    errors = [f"event: {e.message}" for e in _validator(registry, EVENT_SCHEMA).iter_errors(event)]
    for facet in _facets(event):
        url = facet["_schemaURL"]
        if url.startswith("https://openlineage.io/"):  # a standard facet: its own schema must be vendored
            errors += [f"{url}: {e.message}" for e in _validator(registry, url).iter_errors(facet)]
        else:
            assert url.startswith("urn:tinymars-pipeline:facets:"), url
    return errors


def _export(home: Path, target: str, *extra: str) -> None:
    assert main(["lineage", "--home", str(home), "--openlineage", target, *extra]) == 0


def _read(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _rows(home: Path, sql: str) -> list[dict[str, Any]]:
    con = duckdb.connect(str(home / "lineage.duckdb"), read_only=True)
    try:
        cur = con.execute(sql)
        cols = [d[0] for d in cur.description]
        return [dict(zip(cols, row, strict=True)) for row in cur.fetchall()]
    finally:
        con.close()


@pytest.fixture(scope="module")
def exported(tiny_reference, tmp_path_factory) -> tuple[Path, list[dict[str, Any]]]:
    """A copy of the session's tiny run home and its file export."""
    home = copy_home(tiny_reference, tmp_path_factory.mktemp("openlineage") / "home")
    out = home.parent / "events.jsonl"
    _export(home, str(out))
    return home, _read(out)


# ------------------------------------------------------------------ schema
def test_vendored_schemas_are_the_ones_the_client_names():
    from openlineage.client.event_v2 import RunEvent
    from openlineage.client.facet_v2 import (
        dataset_type_dataset,
        dataset_version_dataset,
        error_message_run,
        input_statistics_input_dataset,
        job_type_job,
        output_statistics_output_dataset,
        parent_run,
        processing_engine_run,
        schema_dataset,
    )

    named = {cls._get_schema().split("#")[0] for cls in (
        RunEvent, dataset_type_dataset.DatasetTypeDatasetFacet, dataset_version_dataset.DatasetVersionDatasetFacet,
        error_message_run.ErrorMessageRunFacet, input_statistics_input_dataset.InputStatisticsInputDatasetFacet,
        job_type_job.JobTypeJobFacet, output_statistics_output_dataset.OutputStatisticsOutputDatasetFacet,
        parent_run.ParentRunFacet, processing_engine_run.ProcessingEngineRunFacet, schema_dataset.SchemaDatasetFacet)}
    vendored = {json.loads(p.read_text())["$id"] for p in SPEC.glob("*.json")}
    assert named == vendored


def test_every_event_is_valid_openlineage(exported, registry):
    _, events = exported
    assert events
    for event in events:
        assert schema_errors(registry, event) == [], event["job"]["name"]
    standard = {f["_schemaURL"] for e in events for f in _facets(e) if f["_schemaURL"].startswith("https://")}
    assert len(standard) >= 7  # jobType, processing_engine, parent, version, datasetType, schema, statistics

    # the validator is live: a broken event and a broken facet are caught
    bad = json.loads(json.dumps(events[0]))
    bad["run"]["runId"], bad["eventType"] = "not-a-uuid", "FINISHED"
    assert len(schema_errors(registry, bad)) == 2
    stage_end = next(e for e in events if e.get("outputs"))
    broken = json.loads(json.dumps(stage_end))
    broken["outputs"][0]["outputFacets"]["outputStatistics"]["rowCount"] = "many"
    assert any("OutputStatistics" in err for err in schema_errors(registry, broken))


# ------------------------------------------------------------------ graph and counts
def test_events_mirror_lineage(exported):
    home, events = exported
    runs = _rows(home, "SELECT * FROM runs")
    stages = _rows(home, "SELECT * FROM stages")
    artifacts = {a["content_hash"]: a for a in _rows(home, "SELECT * FROM artifacts")}
    edges = {(e["parent_hash"], e["child_hash"]) for e in _rows(home, "SELECT * FROM edges")}
    assert len(runs) == 1 and len(stages) == 10  # the tiny reference: one run, ten stage rows

    kinds = [e["eventType"] for e in events]
    assert len(events) == 2 * len(runs) + 2 * len(stages)
    assert kinds.count("START") == len(runs) + len(stages)
    assert kinds.count("COMPLETE") == len(runs) + len(stages) and "FAIL" not in kinds

    run_events = [e for e in events if "parent" not in e["run"]["facets"]]
    stage_events = [e for e in events if "parent" in e["run"]["facets"]]
    assert [e["eventType"] for e in run_events] == ["START", "COMPLETE"]
    assert run_events[0]["eventTime"] == runs[0]["started_at"].isoformat() + "+00:00"
    assert run_events[1]["eventTime"] == runs[0]["ended_at"].isoformat() + "+00:00"
    run_id, run_job = run_events[0]["run"]["runId"], run_events[0]["job"]["name"]
    assert run_events[0]["run"]["facets"]["tinymars_run"]["lineageRunId"] == runs[0]["run_id"]
    for e in stage_events:
        parent = e["run"]["facets"]["parent"]
        assert parent["run"]["runId"] == run_id and parent["job"]["name"] == run_job
        assert parent["root"]["run"]["runId"] == run_id
    assert len({e["run"]["runId"] for e in stage_events}) == len(stages)

    completes = {e["run"]["facets"]["tinymars_stage"]["name"]: e for e in stage_events
                 if e["eventType"] == "COMPLETE"}
    produced = {s["name"]: s["artifact_hash"] for s in stages}
    stage_of = {s["artifact_hash"]: s["stage"] for s in stages}
    assert set(completes) == set(produced)
    exported_edges: set[tuple[str, str]] = set()
    for s in stages:
        event = completes[s["name"]]
        assert event["eventTime"] == s["ended_at"].isoformat() + "+00:00"
        [out] = event["outputs"]
        art = artifacts[s["artifact_hash"]]
        assert out["name"] == s["artifact_hash"] == out["facets"]["version"]["datasetVersion"]
        assert out["namespace"] == f"tinymars://{home.resolve()}"
        assert out["facets"]["datasetType"]["subType"] == art["kind"]
        stats = out["outputFacets"]["outputStatistics"]
        assert (stats["size"], stats.get("rowCount"), stats["fileCount"]) == (art["bytes"], art["rows"], art["files"])
        # every input is the output of an upstream stage of the same run (the stage graph; an optional
        # parent such as steer -> generate feeds only when the profile uses it), and only a root has none
        inputs = {d["name"] for d in event["inputs"]}
        exported_edges |= {(h, s["artifact_hash"]) for h in inputs}
        assert {stage_of[h] for h in inputs} <= set(PARENTS[s["stage"]]), s["name"]
        assert bool(inputs) == bool(PARENTS[s["stage"]]), s["name"]
    assert exported_edges == edges  # one run: the inputs are exactly lineage's parent edges

    # schema where the row table is known: the packed shards' columns (ARCHITECTURE.md) and the channel names
    pack_fields = {f["name"] for f in completes["pack"]["outputs"][0]["facets"]["schema"]["fields"]}
    assert {"row_id", "prompt_id", "capability", "input_ids", "loss_mask", "channels", "target_bytes"} <= pack_fields
    channels_json = json.loads((Path(artifacts[produced["channels"]]["path"]) / "channels.json").read_text())
    channel_fields = [f["name"] for f in completes["channels"]["outputs"][0]["facets"]["schema"]["fields"]]
    assert sorted(channel_fields) == sorted(channels_json["names"])
    corpus_fields = {f["name"] for f in completes["corpus"]["outputs"][0]["facets"]["schema"]["fields"]}
    assert {"row_id", "prompt_id", "capability", "split", "prompt", "channel_state", "target"} <= corpus_fields
    assert "schema" not in completes["tokenizer"]["outputs"][0]["facets"]  # no row table: no schema claimed


def test_export_is_repeatable_and_carries_no_environment(exported, tmp_path, monkeypatch):
    home, events = exported
    canary = "tm-canary-7f3e9a51c2"
    monkeypatch.setenv("TINYMARS_CANARY", canary)
    # what would make OpenLineageClient add environment values and tags to every event: must not reach ours
    monkeypatch.setenv("OPENLINEAGE__FACETS__ENVIRONMENT_VARIABLES", '["TINYMARS_CANARY"]')
    monkeypatch.setenv("OPENLINEAGE__TAGS__RUN__SECRET", canary)
    out = tmp_path / "again.jsonl"
    _export(home, str(out))
    text = out.read_text()
    assert canary not in text and "environmentVariables" not in text
    assert _read(out) == events  # the same history gives the same events (UUIDv5 run ids, lineage times)


# ------------------------------------------------------------------ HTTP
class _Collector(BaseHTTPRequestHandler):
    received: list[tuple[str, dict[str, str], bytes]] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.received.append((self.path, dict(self.headers), body))
        self.send_response(201)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def lineage_server():
    _Collector.received = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Collector)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", _Collector.received
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def test_http_export_reaches_a_server(exported, lineage_server, monkeypatch):
    home, events = exported
    url, received = lineage_server
    key = "ol-key-0d4c2b9e11aa"
    monkeypatch.setenv("OPENLINEAGE_API_KEY", key)
    run_id = events[0]["run"]["facets"]["tinymars_run"]["lineageRunId"]
    _export(home, url, "--run", run_id[:10])  # Marquez style: host only, the default endpoint
    assert [json.loads(body) for _, _, body in received] == events
    assert {path for path, _, _ in received} == {"/api/v1/lineage"}
    assert all(h["Authorization"] == f"Bearer {key}" for _, h, _ in received)
    assert not any(key.encode() in body for _, _, body in received)

    received.clear()
    _export(home, f"{url}/openapi/openlineage/api/v1/lineage")  # DataHub style: the full endpoint
    assert len(received) == len(events)
    assert {path for path, _, _ in received} == {"/openapi/openlineage/api/v1/lineage"}


# ------------------------------------------------------------------ failures and bad input
def test_failed_stage_and_run_become_fail_events(tmp_path, registry):
    from tinymars.lineage import Lineage

    home = tmp_path / "home"
    lin = Lineage(home / "lineage.duckdb")
    lin.start_run({"run_id": "r-fail", "profile_name": "tiny", "profile_hash": "ph", "profile_json": "{}",
                   "code_version": "cv", "git_sha": None, "git_dirty": None})
    art = {"stage": "corpus", "key": "k1", "path": str(tmp_path / "gone"), "content_hash": "c0ffee",
           "files": {"corpus.jsonl": {"sha256": "x", "bytes": 10}}, "rows": 3}
    lin.record_stage("r-fail", {"stage": "corpus", "name": "corpus", "key": "k1", "cache_hit": False,
                                "duration_s": 0.5, "artifact": art, "inputs": {}})
    lin.record_stage("r-fail", {"stage": "tokenizer", "name": "tokenizer", "status": "failed", "duration_s": 0.1,
                                "error": "ValueError: vocab_size too large"})
    lin.finish_run("r-fail", "failed", "ValueError: vocab_size too large")
    out = tmp_path / "events.jsonl"
    _export(home, str(out))
    events = _read(out)
    assert [e["eventType"] for e in events].count("FAIL") == 2
    assert all(schema_errors(registry, e) == [] for e in events)
    fails = [e for e in events if e["eventType"] == "FAIL"]
    assert all(e["run"]["facets"]["errorMessage"]["message"] == "ValueError: vocab_size too large" for e in fails)
    failed_stage = next(e for e in fails if "parent" in e["run"]["facets"])
    assert failed_stage["outputs"] == [] and failed_stage["job"]["name"] == "iteration.tiny.tokenizer"
    corpus_end = next(e for e in events if e["eventType"] == "COMPLETE")
    assert "schema" not in corpus_end["outputs"][0]["facets"]  # the artifact folder is gone: no schema claimed

    # a run that continues another run's artifact (a serve-model checkpoint) names it as its input
    lin.start_run({"run_id": "serve-1", "flow": "serve", "profile_name": "native", "profile_hash": "ph",
                   "profile_json": "{}", "code_version": "cv"})
    ckpt = {**art, "stage": "train", "key": "k2", "content_hash": "beef01"}
    lin.record_stage("serve-1", {"stage": "train", "name": "online:native", "key": "k2", "cache_hit": False,
                                 "duration_s": 1.0, "artifact": ckpt, "inputs": {"corpus": "c0ffee"}})
    lin.finish_run("serve-1", "completed")
    _export(home, str(out), "--run", "serve-1")
    events = _read(out)
    assert len(events) == 4 and all(schema_errors(registry, e) == [] for e in events)
    ckpt_end = next(e for e in events if e["eventType"] == "COMPLETE" and "parent" in e["run"]["facets"])
    assert [d["name"] for d in ckpt_end["inputs"]] == ["c0ffee"]
    assert ckpt_end["job"]["name"] == "serve.native.online:native"


def test_an_artifact_rebuilt_from_other_inputs_keeps_each_runs_own_parents():
    from tinymars.openlineage import stage_inputs

    kinds = {"corpus-a": "corpus", "corpus-b": "corpus", "model-x": "train", "tok": "tokenizer"}
    artifacts = {h: {"kind": k} for h, k in kinds.items()}
    # the same tokenizer bytes came from two corpora: each run names only the corpus it built
    assert stage_inputs({"corpus-a", "corpus-b"}, {"corpus-b", "tok"}, artifacts) == ["corpus-b"]
    assert stage_inputs({"corpus-a", "corpus-b"}, {"corpus-a", "tok"}, artifacts) == ["corpus-a"]
    # a parent of a kind this run never built came from another run: it is an input
    assert stage_inputs({"model-x"}, {"tok"}, artifacts) == ["model-x"]


@pytest.mark.parametrize("target, extra, message", [
    ("ftp://host/x", [], "only http(s) URLs or a local file path"),
    ("{tmp}/missing/x.jsonl", [], "does not exist; create it first"),
    ("{tmp}", [], "is a folder"),
    ("http://", [], "has no host"),
    ("{tmp}/x.jsonl", ["--run", "nope"], "no run or artifact starts with 'nope'"),
])
def test_bad_targets_fail_before_work(exported, tmp_path, capsys, target, extra, message):
    home, _ = exported
    code = main(["lineage", "--home", str(home), "--openlineage", target.format(tmp=tmp_path), *extra])
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "x.jsonl").exists()
