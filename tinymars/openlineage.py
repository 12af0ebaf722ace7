"""Lineage rows -> OpenLineage events, sent to a file (one JSON event a line) or a Marquez/DataHub HTTP endpoint.

Every run becomes a job run (`<flow>.<profile>`) and every stage its own job run (`<flow>.<profile>.<stage
name>`) whose ParentRunFacet points at the run. Datasets are artifacts, named by content hash in the
namespace `tinymars://<home>`, with facets for schema (where an artifact's row table can be read),
size, rows, content hash (dataset version) and kind. Event times are the lineage timestamps (UTC), and
run ids are UUIDv5 of the lineage ids, so exporting the same history twice sends the same events.

Why the client's transports and not `OpenLineageClient`: the client merges `openlineage.yml` and
`OPENLINEAGE__*` variables into every event it emits (environment-variable facets, tags, filters). An
export must carry only lineage rows, never an environment value, so the events go straight to the
client's FileTransport / HttpTransport and nothing from the environment reaches them. The one value
read from the environment is the HTTP API key (`OPENLINEAGE_API_KEY`, the client's own convention),
which is sent only in the Authorization header.
"""

from __future__ import annotations

import json
import os
import struct
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import attr
from openlineage.client.constants import __version__ as CLIENT_VERSION
from openlineage.client.event_v2 import InputDataset, Job, OutputDataset, Run, RunEvent, RunState
from openlineage.client.facet_v2 import (
    DatasetFacet,
    RunFacet,
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
from openlineage.client.serde import Serde

from tinymars.lineage import Lineage

try:
    PROJECT_VERSION = version("tinymars-pipeline")
except PackageNotFoundError:  # a checkout used without `pip install -e .`
    PROJECT_VERSION = "0.0.0"
# Who produced the events; a URN because the project has no public URL to point at.
PRODUCER = f"urn:tinymars-pipeline:{PROJECT_VERSION}"
# Our own facets are documented in ARCHITECTURE.md ("OpenLineage export"); there is no hosted JSON schema.
FACET_SCHEMA = "urn:tinymars-pipeline:facets:1-0-0:"
RUN_UUID_NAMESPACE = uuid.UUID("5b0e9c1e-7f38-4c55-9d7e-2c1f3a6a4e10")  # fixed: the same run id, the same UUID
DEFAULT_HTTP_ENDPOINT = "api/v1/lineage"  # Marquez; DataHub: give the full URL (/openapi/openlineage/api/v1/lineage)
API_KEY_ENV = "OPENLINEAGE_API_KEY"
MODEL_KINDS = frozenset({"train"})


# ------------------------------------------------------------------ our facets
@attr.define
class TinymarsRunFacet(RunFacet):
    """The lineage run a job run came from: its id, profile, code and git state (no profile values)."""

    lineageRunId: str  # noqa: N815 (OpenLineage field names are camelCase)
    flow: str
    profileName: str  # noqa: N815
    profileHash: str  # noqa: N815
    codeVersion: str  # noqa: N815
    status: str
    gitSha: str | None = None  # noqa: N815
    gitDirty: bool | None = None  # noqa: N815
    refresh: list[str] = attr.field(factory=list)
    prefectFlowRunId: str | None = None  # noqa: N815

    @staticmethod
    def _get_schema() -> str:
        return FACET_SCHEMA + "TinymarsRunFacet"


@attr.define
class TinymarsStageFacet(RunFacet):
    """A stage's row: whether it was a cache hit, its cache key and duration, and its metrics."""

    stage: str
    name: str
    status: str
    cacheHit: bool | None = None  # noqa: N815
    cacheKey: str | None = None  # noqa: N815
    durationSeconds: float | None = None  # noqa: N815
    metrics: list[dict[str, Any]] = attr.field(factory=list)

    @staticmethod
    def _get_schema() -> str:
        return FACET_SCHEMA + "TinymarsStageFacet"


@attr.define
class TinymarsTeacherFacet(RunFacet):
    """What a run's teacher calls cost, per model and endpoint (endpoints are stored without user info)."""

    calls: list[dict[str, Any]]

    @staticmethod
    def _get_schema() -> str:
        return FACET_SCHEMA + "TinymarsTeacherFacet"


@attr.define
class TinymarsArtifactFacet(DatasetFacet):
    """The artifact behind a dataset: kind, name, cache key, folder, files, bytes, rows, content hash."""

    kind: str
    name: str
    contentHash: str  # noqa: N815
    cacheKey: str | None = None  # noqa: N815
    path: str | None = None
    files: int | None = None
    bytes: int | None = None
    rows: int | None = None
    createdByRun: str | None = None  # noqa: N815

    @staticmethod
    def _get_schema() -> str:
        return FACET_SCHEMA + "TinymarsArtifactFacet"


# ------------------------------------------------------------------ targets
def check_target(target: str) -> str:
    """'http' or 'file' for an export target, checked before any work; ValueError names the fix."""
    scheme = urlsplit(target).scheme.lower()
    if scheme in ("http", "https"):
        if not urlsplit(target).hostname:
            raise ValueError(f"--openlineage: '{target}' has no host; give e.g. http://localhost:5000 (Marquez)")
        return "http"
    if "://" in target:
        raise ValueError(f"--openlineage: '{target}': only http(s) URLs or a local file path are supported")
    parent = Path(target).expanduser().resolve().parent
    if not parent.is_dir():
        raise ValueError(f"--openlineage: the folder of '{target}' ({parent}) does not exist; create it first")
    if Path(target).is_dir():
        raise ValueError(f"--openlineage: '{target}' is a folder; give a file path such as {target}/events.jsonl")
    return "file"


def public_target(target: str) -> str:
    """A target fit for messages: an URL without user info, query or fragment; a path as given."""
    parts = urlsplit(target)
    if parts.scheme.lower() not in ("http", "https"):
        return target
    netloc = f"{parts.hostname}:{parts.port}" if parts.port else (parts.hostname or "")
    return f"{parts.scheme}://{netloc}{parts.path}"


def default_namespace(home: Path | str) -> str:
    return f"tinymars://{Path(home).expanduser().resolve()}"


def _transport(target: str) -> Any:
    if check_target(target) == "http":
        from openlineage.client.transport.http import HttpConfig, HttpTransport

        parts = urlsplit(target)
        endpoint = parts.path.lstrip("/") or DEFAULT_HTTP_ENDPOINT
        if parts.query:
            endpoint += f"?{parts.query}"
        config: dict[str, Any] = {"url": f"{parts.scheme}://{parts.netloc}", "endpoint": endpoint,
                                  "retry": {"total": 3, "connect": 3, "read": 3}}
        if key := os.environ.get(API_KEY_ENV):
            config["auth"] = {"type": "api_key", "apiKey": key}
        return HttpTransport(HttpConfig.from_dict(config))
    from openlineage.client.transport.file import FileConfig, FileTransport

    path = Path(target).expanduser().resolve()
    path.write_text("")  # the export replaces the file: the transport only appends
    return FileTransport(FileConfig(log_file_path=str(path), append=True))


def send(events: Iterable[RunEvent], target: str) -> int:
    """Emit events to a file or an HTTP endpoint through the client's transport; returns how many were sent."""
    transport = _transport(target)
    sent = 0
    try:
        for event in events:
            try:
                transport.emit(event)
            except Exception as exc:  # the message names the endpoint, never the key (it is only in a header)
                raise RuntimeError(f"sending OpenLineage event {sent + 1} to {public_target(target)} failed: "
                                   f"{type(exc).__name__}: {exc}") from None
            sent += 1
    finally:
        transport.close()
    return sent


# ------------------------------------------------------------------ events
def _time(ts: datetime) -> str:
    return ts.replace(tzinfo=UTC).isoformat()


def run_uuid(*parts: str) -> str:
    return str(uuid.uuid5(RUN_UUID_NAMESPACE, "/".join(parts)))


def _job_type(kind: str) -> dict[str, Any]:
    return {"jobType": job_type_job.JobTypeJobFacet(processingType="BATCH", integration="TINYMARS", jobType=kind,
                                                    producer=PRODUCER)}


def _engine() -> processing_engine_run.ProcessingEngineRunFacet:
    return processing_engine_run.ProcessingEngineRunFacet(
        version=PROJECT_VERSION, name="tinymars", openlineageAdapterVersion=CLIENT_VERSION, producer=PRODUCER)


def _failed(status: str) -> bool:
    return status not in ("completed", "running")


def lineage_events(lin: Lineage, namespace: str, run_ids: Iterable[str] | None = None) -> list[RunEvent]:
    """OpenLineage events for the given runs (default: every run), in event-time order."""
    runs = lin.query("SELECT * FROM runs ORDER BY started_at, run_id")
    if run_ids is not None:
        wanted = set(run_ids)
        runs = [r for r in runs if r["run_id"] in wanted]
    artifacts = {a["content_hash"]: a for a in lin.query("SELECT * FROM artifacts")}
    parents: dict[str, set[str]] = {}
    for edge in lin.query("SELECT parent_hash, child_hash FROM edges"):
        parents.setdefault(edge["child_hash"], set()).add(edge["parent_hash"])
    datasets = _DatasetFacets(artifacts, namespace)
    events: list[tuple[tuple[Any, ...], RunEvent]] = []
    for run in runs:
        events += _run_events(lin, run, namespace, parents, datasets)
    return [e for _, e in sorted(events, key=lambda pair: pair[0])]


def _run_events(lin: Lineage, run: dict[str, Any], namespace: str, parents: dict[str, set[str]],
                datasets: _DatasetFacets) -> list[tuple[tuple[Any, ...], RunEvent]]:
    run_id = run["run_id"]
    job = Job(namespace=namespace, name=f"{run['flow']}.{run['profile_name']}", facets=_job_type("DAG"))
    run_uid = run_uuid(run_id)
    facets: dict[str, Any] = {
        "tinymars_run": TinymarsRunFacet(
            lineageRunId=run_id, flow=run["flow"], profileName=run["profile_name"],
            profileHash=run["profile_hash"], codeVersion=run["code_version"], status=run["status"],
            gitSha=run["git_sha"], gitDirty=run["git_dirty"], refresh=json.loads(run["refresh"] or "[]"),
            prefectFlowRunId=run["prefect_flow_run_id"] or None, producer=PRODUCER),
        "processing_engine": _engine(),
    }
    if teacher := _teacher_summary(lin, run_id):
        facets["tinymars_teacher"] = TinymarsTeacherFacet(calls=teacher, producer=PRODUCER)
    out = [((run["started_at"], 0, run_id), _event(RunState.START, run["started_at"], run_uid, job, facets))]
    if run["ended_at"] is not None:
        state = RunState.FAIL if _failed(run["status"]) else RunState.COMPLETE
        end_facets = dict(facets)
        if state == RunState.FAIL:
            end_facets["errorMessage"] = _error(run["error"] or run["status"])
        out.append(((run["ended_at"], 3, run_id), _event(state, run["ended_at"], run_uid, job, end_facets)))

    parent = parent_run.ParentRunFacet(
        run=parent_run.Run(runId=run_uid), job=parent_run.Job(namespace=namespace, name=job.name),
        root=parent_run.Root(run=parent_run.RootRun(runId=run_uid),
                             job=parent_run.RootJob(namespace=namespace, name=job.name)),
        producer=PRODUCER)
    stages = lin.query("SELECT * FROM stages WHERE run_id = ? ORDER BY started_at, ended_at", [run_id])
    run_outputs = {s["artifact_hash"] for s in stages if s["artifact_hash"]}
    metrics = _metrics(lin, run_id)
    for index, stage in enumerate(stages):
        stage_job = Job(namespace=namespace, name=f"{job.name}.{stage['name']}", facets=_job_type("TASK"))
        stage_uid = run_uuid(run_id, stage["name"], str(index))
        output = stage["artifact_hash"]
        inputs = stage_inputs(parents.get(output, set()) if output else set(), run_outputs, datasets.artifacts)
        stage_facets = {
            "parent": parent, "processing_engine": _engine(),
            "tinymars_stage": TinymarsStageFacet(
                stage=stage["stage"], name=stage["name"], status=stage["status"], cacheHit=stage["cache_hit"],
                cacheKey=stage["cache_key"], durationSeconds=stage["duration_s"],
                metrics=metrics.get(stage["name"], []), producer=PRODUCER),
        }
        start = _event(RunState.START, stage["started_at"], stage_uid, stage_job, stage_facets,
                       inputs=[datasets.input(h) for h in inputs])
        failed = _failed(stage["status"])
        end_facets = dict(stage_facets)
        if failed:
            end_facets["errorMessage"] = _error(stage["error"] or stage["status"])
        end = _event(RunState.FAIL if failed else RunState.COMPLETE, stage["ended_at"], stage_uid, stage_job,
                     end_facets, inputs=[datasets.input(h) for h in inputs],
                     outputs=[datasets.output(output)] if output else [])
        out += [((stage["started_at"], 1, run_id, index), start), ((stage["ended_at"], 2, run_id, index), end)]
    return out


def stage_inputs(parents: set[str], run_outputs: set[str], artifacts: dict[str, dict[str, Any]]) -> list[str]:
    """A stage's input artifacts among its artifact's parents.

    Edges belong to an artifact, not to a run: when two runs built the same bytes from different inputs
    (an unchanged tokenizer from an edited corpus), the artifact has a parent from each. So a parent
    counts when this run produced it, or when this run produced no artifact of its kind at all (an input
    from another run, e.g. the model a `serve-model` checkpoint continued).
    """
    run_kinds = {artifacts[h]["kind"] for h in run_outputs if h in artifacts}
    return sorted(h for h in parents
                  if h in run_outputs or artifacts.get(h, {}).get("kind") not in run_kinds)


def _event(state: RunState, when: datetime, run_uid: str, job: Job, facets: dict[str, Any],
           inputs: list[InputDataset] | None = None, outputs: list[OutputDataset] | None = None) -> RunEvent:
    return RunEvent(eventType=state, eventTime=_time(when), run=Run(runId=run_uid, facets=facets), job=job,
                    inputs=inputs or [], outputs=outputs or [], producer=PRODUCER)


def _error(message: str) -> error_message_run.ErrorMessageRunFacet:
    return error_message_run.ErrorMessageRunFacet(message=message, programmingLanguage="python", producer=PRODUCER)


def _metrics(lin: Lineage, run_id: str) -> dict[str, list[dict[str, Any]]]:
    by_stage: dict[str, list[dict[str, Any]]] = {}
    for m in lin.query("SELECT name, key, value, step FROM metrics WHERE run_id = ? ORDER BY name, key, step",
                       [run_id]):
        by_stage.setdefault(m["name"], []).append({"key": m["key"], "value": m["value"], "step": m["step"]})
    return by_stage


def _teacher_summary(lin: Lineage, run_id: str) -> list[dict[str, Any]]:
    return lin.query(
        "SELECT model, endpoint, count(*) AS calls, count(*) FILTER (WHERE cache_hit) AS cache_hits,"
        " coalesce(sum(prompt_tokens), 0) AS prompt_tokens, coalesce(sum(completion_tokens), 0) AS completion_tokens,"
        " round(coalesce(sum(price_usd) FILTER (WHERE NOT coalesce(cache_hit, false)), 0), 6) AS price_usd"
        " FROM teacher_calls WHERE run_id = ? GROUP BY ALL ORDER BY model, endpoint",
        [run_id],
    )


# ------------------------------------------------------------------ datasets
class _DatasetFacets:
    """Dataset facets per artifact, built once per export (the schema reads the artifact's row table)."""

    def __init__(self, artifacts: dict[str, dict[str, Any]], namespace: str):
        self.artifacts = artifacts
        self.namespace = namespace
        self._facets: dict[str, dict[str, Any]] = {}

    def facets(self, content_hash: str) -> dict[str, Any]:
        if content_hash not in self._facets:
            self._facets[content_hash] = self._build(content_hash)
        return self._facets[content_hash]

    def _build(self, content_hash: str) -> dict[str, Any]:
        art = self.artifacts.get(content_hash)
        if art is None:  # a stage row whose artifact row is missing: name it, claim nothing else
            return {"version": dataset_version_dataset.DatasetVersionDatasetFacet(datasetVersion=content_hash,
                                                                                producer=PRODUCER)}
        facets: dict[str, Any] = {
            "version": dataset_version_dataset.DatasetVersionDatasetFacet(datasetVersion=content_hash,
                                                                          producer=PRODUCER),
            "datasetType": dataset_type_dataset.DatasetTypeDatasetFacet(
                datasetType="MODEL" if art["kind"] in MODEL_KINDS else "FILE", subType=art["kind"],
                producer=PRODUCER),
            "tinymars_artifact": TinymarsArtifactFacet(
                kind=art["kind"], name=art["name"], contentHash=content_hash, cacheKey=art["cache_key"],
                path=art["path"], files=art["files"], bytes=art["bytes"], rows=art["rows"],
                createdByRun=art["created_by_run"], producer=PRODUCER),
        }
        if fields := table_schema(Path(art["path"]), art["rows"]) if art["path"] else None:
            facets["schema"] = schema_dataset.SchemaDatasetFacet(fields=fields, producer=PRODUCER)
        return facets

    def input(self, content_hash: str) -> InputDataset:
        art = self.artifacts.get(content_hash, {})
        stats = input_statistics_input_dataset.InputStatisticsInputDatasetFacet(
            rowCount=art.get("rows"), size=art.get("bytes"), fileCount=art.get("files"), producer=PRODUCER)
        return InputDataset(namespace=self.namespace, name=content_hash, facets=self.facets(content_hash),
                            inputFacets={"inputStatistics": stats})

    def output(self, content_hash: str) -> OutputDataset:
        art = self.artifacts.get(content_hash, {})
        stats = output_statistics_output_dataset.OutputStatisticsOutputDatasetFacet(
            rowCount=art.get("rows"), size=art.get("bytes"), fileCount=art.get("files"), producer=PRODUCER)
        return OutputDataset(namespace=self.namespace, name=content_hash, facets=self.facets(content_hash),
                             outputFacets={"outputStatistics": stats})


Field = schema_dataset.SchemaDatasetFacetFields


def table_schema(folder: Path, rows: int | None) -> list[Field] | None:
    """The columns of the file(s) holding an artifact's `rows` rows, or None when no file is such a table.

    Parquet shards whose row counts add up to `rows`; else a JSON-lines file with `rows` lines (fields of
    its first row); else a safetensors file whose every tensor has `rows` as its first dimension (one
    column per tensor, e.g. the channels). Only the manifest's files are read, never anything else.
    """
    manifest = folder / "manifest.json"
    if rows is None or not manifest.is_file():
        return None
    names = sorted(json.loads(manifest.read_text())["files"])
    for reader in (_parquet_fields, _jsonl_fields, _safetensors_fields):
        for fields in reader(folder, names, rows):
            if fields:
                return fields
    return None


def _parquet_fields(folder: Path, names: list[str], rows: int) -> Iterable[list[Field] | None]:
    shards = [folder / n for n in names if n.endswith(".parquet")]
    if not shards:
        return
    import pyarrow.parquet as pq

    if sum(pq.ParquetFile(s).metadata.num_rows for s in shards) == rows:
        yield [Field(name=f.name, type=str(f.type), fields=None) for f in pq.read_schema(shards[0])]


_JSON_TYPES = {str: "string", bool: "boolean", int: "integer", float: "number", list: "array", dict: "object"}
SCHEMA_SAMPLE_ROWS = 1000  # rows read to type a JSON-lines table: enough to meet every optional key in practice


def _merge_json(shape: dict[str, Any], row: dict[str, Any]) -> None:
    """Fold one JSON object into name -> {"type", "fields"}: the first non-null type wins, objects nest."""
    for key, value in row.items():
        slot = shape.setdefault(key, {"type": "null", "fields": {}})
        if slot["type"] == "null" and value is not None:
            slot["type"] = _JSON_TYPES.get(type(value), "string")
        if isinstance(value, dict):
            _merge_json(slot["fields"], value)


def _json_fields(shape: dict[str, Any]) -> list[Field]:
    return [Field(name=k, type=v["type"], fields=_json_fields(v["fields"]) or None) for k, v in shape.items()]


def _jsonl_fields(folder: Path, names: list[str], rows: int) -> Iterable[list[Field] | None]:
    for name in (n for n in names if n.endswith(".jsonl")):
        shape: dict[str, Any] = {}
        lines = 0
        with (folder / name).open("rb") as f:
            for line in f:
                lines += 1
                if lines <= SCHEMA_SAMPLE_ROWS and line.strip():
                    row = json.loads(line)
                    if isinstance(row, dict):
                        _merge_json(shape, row)
        if lines == rows and shape:
            yield _json_fields(shape)


def _safetensors_fields(folder: Path, names: list[str], rows: int) -> Iterable[list[Field] | None]:
    for name in (n for n in names if n.endswith(".safetensors")):
        with (folder / name).open("rb") as f:
            header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        tensors = {k: v for k, v in header.items() if k != "__metadata__"}
        if tensors and all(v["shape"][:1] == [rows] for v in tensors.values()):
            yield [Field(name=k, type=f"{v['dtype'].lower()}{v['shape'][1:]}", fields=None)
                   for k, v in sorted(tensors.items())]


def to_json(event: RunEvent) -> str:
    """The event exactly as a transport serialises it (for tests and previews)."""
    return Serde.to_json(event)
