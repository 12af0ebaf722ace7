"""The one lineage store: runs, stages, artifacts, parent edges, metrics and teacher calls in DuckDB.

Only the flow process writes (tasks hand their records back). DuckDB allows one process per file
while it is open for writing, so each write (and each read) opens a short-lived connection and
retries with jittered backoff while another process holds the lock; nothing keeps the file open
between calls, so two runs, and readers like `tinymars runs` / `cost`, can share one database.
A write is one transaction, so it lands whole or not at all; bulk rows (teacher calls, metrics) go
in as one Arrow batch, so even a 10,000-call corpus holds the lock for well under a second. A lock
that never frees (a shell left open on the file) ends in LineageLocked naming the file, after
`lock_timeout_s`. See ARCHITECTURE.md "Concurrent runs".
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id VARCHAR PRIMARY KEY, flow VARCHAR, profile_name VARCHAR, profile_hash VARCHAR,
    profile_json VARCHAR, code_version VARCHAR, git_sha VARCHAR, git_dirty BOOLEAN,
    status VARCHAR, started_at TIMESTAMP, ended_at TIMESTAMP, error VARCHAR,
    prefect_flow_run_id VARCHAR, parent_run_id VARCHAR, refresh VARCHAR);
CREATE TABLE IF NOT EXISTS stages (
    run_id VARCHAR, stage VARCHAR, name VARCHAR, cache_key VARCHAR, cache_hit BOOLEAN,
    status VARCHAR, started_at TIMESTAMP, ended_at TIMESTAMP, duration_s DOUBLE,
    artifact_hash VARCHAR, error VARCHAR);
CREATE TABLE IF NOT EXISTS artifacts (
    content_hash VARCHAR PRIMARY KEY, kind VARCHAR, name VARCHAR, cache_key VARCHAR, path VARCHAR,
    bytes BIGINT, rows BIGINT, files INTEGER, created_at TIMESTAMP, created_by_run VARCHAR);
CREATE TABLE IF NOT EXISTS edges (
    parent_hash VARCHAR, child_hash VARCHAR, PRIMARY KEY (parent_hash, child_hash));
CREATE TABLE IF NOT EXISTS metrics (
    run_id VARCHAR, stage VARCHAR, name VARCHAR, key VARCHAR, value DOUBLE, step BIGINT,
    artifact_hash VARCHAR);
CREATE TABLE IF NOT EXISTS teacher_calls (
    run_id VARCHAR, call_key VARCHAR, capability VARCHAR, model VARCHAR, endpoint VARCHAR,
    prompt_tokens BIGINT, completion_tokens BIGINT, cached_tokens BIGINT, reasoning_tokens BIGINT,
    price_usd DOUBLE, latency_s DOUBLE, status VARCHAR, attempt INTEGER, cache_hit BOOLEAN,
    error VARCHAR, created_at TIMESTAMP);
"""


# Arrow types of the bulk-inserted tables' columns (named in SCHEMA).
BATCH_TABLES: dict[str, list[tuple[str, pa.DataType]]] = {
    "metrics": [("run_id", pa.string()), ("stage", pa.string()), ("name", pa.string()), ("key", pa.string()),
                ("value", pa.float64()), ("step", pa.int64()), ("artifact_hash", pa.string())],
    "teacher_calls": [
        ("run_id", pa.string()), ("call_key", pa.string()), ("capability", pa.string()), ("model", pa.string()),
        ("endpoint", pa.string()), ("prompt_tokens", pa.int64()), ("completion_tokens", pa.int64()),
        ("cached_tokens", pa.int64()), ("reasoning_tokens", pa.int64()), ("price_usd", pa.float64()),
        ("latency_s", pa.float64()), ("status", pa.string()), ("attempt", pa.int32()), ("cache_hit", pa.bool_()),
        ("error", pa.string()), ("created_at", pa.timestamp("us"))],
}
TEACHER_CALL_COLUMNS = [c for c, _ in BATCH_TABLES["teacher_calls"] if c not in ("run_id", "created_at")]


def _insert_batch(con: duckdb.DuckDBPyConnection, table: str, rows: list[dict[str, Any]]) -> None:
    """Insert rows as one Arrow batch: row-at-a-time INSERTs take ~1.5 ms each, which for a big corpus's
    teacher calls would hold the database lock (and block every other run) for many seconds."""
    if not rows:
        return
    schema = pa.schema(BATCH_TABLES[table])

    def column(name: str, kind: pa.DataType) -> pa.Array:
        values = [r.get(name) for r in rows]
        if kind == pa.string():  # what DuckDB's VARCHAR would have cast (an int error code, say)
            values = [None if v is None else str(v) for v in values]
        return pa.array(values, type=kind)

    batch = pa.table({f.name: column(f.name, f.type) for f in schema}, schema=schema)
    con.register("_batch", batch)
    try:
        cols = ", ".join(schema.names)
        con.execute(f"INSERT INTO {table} ({cols}) SELECT {cols} FROM _batch")
    finally:
        con.unregister("_batch")


def now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


class LineageLocked(RuntimeError):
    pass


class Lineage:
    def __init__(self, path: Path | str, lock_timeout_s: float = 120.0):
        self.path = Path(path)
        self.lock_timeout_s = lock_timeout_s
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as con:
            con.execute(SCHEMA)

    @contextmanager
    def _connect(self, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
        deadline = time.monotonic() + self.lock_timeout_s
        delay = 0.02
        while True:
            try:
                con = duckdb.connect(str(self.path), read_only=read_only and self.path.exists())
                break
            except duckdb.IOException as exc:
                if "lock" not in str(exc).lower() or time.monotonic() > deadline:
                    raise LineageLocked(
                        f"lineage database {self.path} is locked by another process for more than "
                        f"{self.lock_timeout_s:.0f}s: {exc}"
                    ) from None
                time.sleep(delay * (1 + random.random()))
                delay = min(delay * 2, 1.0)
        try:
            yield con
        finally:
            con.close()

    def _write(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        if not rows:
            return
        with self._connect() as con:
            con.execute("BEGIN")
            con.executemany(sql, rows)
            con.execute("COMMIT")

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        with self._connect(read_only=True) as con:
            cur = con.execute(sql, params)
            cols = [d[0] for d in cur.description]
            return [dict(zip(cols, row, strict=True)) for row in cur.fetchall()]

    # ------------------------------------------------------------ runs
    def start_run(self, run: dict[str, Any]) -> None:
        self._write(
            "INSERT INTO runs (run_id, flow, profile_name, profile_hash, profile_json, code_version, git_sha,"
            " git_dirty, status, started_at, prefect_flow_run_id, parent_run_id, refresh)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'running', ?, ?, ?, ?)",
            [[
                run["run_id"], run.get("flow", "iteration"), run["profile_name"], run["profile_hash"],
                run["profile_json"], run["code_version"], run.get("git_sha"), run.get("git_dirty"),
                now(), run.get("prefect_flow_run_id"), run.get("parent_run_id"),
                json.dumps(run.get("refresh", [])),
            ]],
        )

    def finish_run(self, run_id: str, status: str, error: str | None = None) -> None:
        self._write(
            "UPDATE runs SET status = ?, ended_at = ?, error = ? WHERE run_id = ?",
            [[status, now(), error, run_id]],
        )

    # ------------------------------------------------------------ stage results
    def record_stage(self, run_id: str, result: dict[str, Any]) -> None:
        """Persist one stage's hand-back: its row, its artifact, parent edges, metrics, teacher calls."""
        art = result.get("artifact")
        ended = now()
        started = datetime.fromtimestamp(ended.timestamp() - float(result.get("duration_s", 0.0)))
        with self._connect() as con:
            con.execute("BEGIN")
            con.execute(
                "INSERT INTO stages VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    run_id, result["stage"], result.get("name", result["stage"]), result.get("key"),
                    result.get("cache_hit"), result.get("status", "completed"), started, ended,
                    result.get("duration_s"), art["content_hash"] if art else None, result.get("error"),
                ],
            )
            if art:
                con.execute(
                    "INSERT INTO artifacts VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                    [
                        art["content_hash"], art["stage"], result.get("name", art["stage"]), art["key"],
                        art["path"], sum(int(f["bytes"]) for f in art["files"].values()), art.get("rows"),
                        len(art["files"]), ended, run_id,
                    ],
                )
                for parent in result.get("inputs", {}).values():
                    con.execute(
                        "INSERT INTO edges VALUES (?, ?) ON CONFLICT DO NOTHING", [parent, art["content_hash"]]
                    )
            name = result.get("name", result["stage"])
            _insert_batch(con, "metrics", [
                {"run_id": run_id, "stage": result["stage"], "name": name, "key": m["key"], "value": float(m["value"]),
                 "step": m.get("step"), "artifact_hash": art["content_hash"] if art else None}
                for m in result.get("metrics", [])
            ])
            created = now()
            _insert_batch(con, "teacher_calls", [
                {**{col: c.get(col) for col in TEACHER_CALL_COLUMNS}, "run_id": run_id, "created_at": created}
                for c in result.get("teacher_calls", [])
            ])
            con.execute("COMMIT")

    # ------------------------------------------------------------ queries
    def runs(self, limit: int = 20) -> list[dict[str, Any]]:
        return self.query(
            "SELECT r.run_id, r.profile_name, r.status, r.started_at, r.ended_at, r.git_sha, r.git_dirty,"
            " count(s.stage) AS stages, count(s.stage) FILTER (WHERE s.cache_hit) AS cache_hits,"
            " round(sum(s.duration_s), 2) AS stage_seconds"
            " FROM runs r LEFT JOIN stages s USING (run_id)"
            " GROUP BY ALL ORDER BY r.started_at DESC LIMIT ?",
            [limit],
        )

    def stages(self, run_id: str) -> list[dict[str, Any]]:
        return self.query(
            "SELECT stage, name, cache_hit, status, round(duration_s, 3) AS duration_s, artifact_hash, error"
            " FROM stages WHERE run_id = ? ORDER BY started_at, ended_at",
            [run_id],
        )

    def resolve(self, ident: str) -> tuple[str, str]:
        """Find a run id or artifact hash by (unique) prefix; returns ('run'|'artifact', full id)."""
        runs = self.query("SELECT run_id FROM runs WHERE run_id LIKE ? || '%'", [ident])
        arts = self.query("SELECT content_hash FROM artifacts WHERE content_hash LIKE ? || '%'", [ident])
        matches = [("run", r["run_id"]) for r in runs] + [("artifact", a["content_hash"]) for a in arts]
        if not matches:
            raise KeyError(f"no run or artifact starts with '{ident}' in {self.path}")
        if len(matches) > 1:
            raise KeyError(f"'{ident}' is ambiguous ({len(matches)} matches); give more characters")
        return matches[0]

    def artifact(self, content_hash: str) -> dict[str, Any]:
        return self.query("SELECT * FROM artifacts WHERE content_hash = ?", [content_hash])[0]

    def parents(self, content_hash: str) -> list[dict[str, Any]]:
        return self.query(
            "SELECT a.* FROM edges e JOIN artifacts a ON a.content_hash = e.parent_hash WHERE e.child_hash = ?"
            " ORDER BY a.kind",
            [content_hash],
        )

    def children(self, content_hash: str) -> list[dict[str, Any]]:
        return self.query(
            "SELECT a.* FROM edges e JOIN artifacts a ON a.content_hash = e.child_hash WHERE e.parent_hash = ?"
            " ORDER BY a.kind",
            [content_hash],
        )

    def metrics(self, run_id: str) -> list[dict[str, Any]]:
        return self.query(
            "SELECT stage, name, key, value, step FROM metrics WHERE run_id = ? ORDER BY stage, name, key",
            [run_id],
        )
