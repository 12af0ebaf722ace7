"""The per-call teacher cache: every answered call is stored durably before it is used.

Lives under HOME/teacher-cache/ (outside the content-addressed artifacts), so a corpus stage that
is killed, crashes or stops on its budget resumes with zero repeated paid calls. One SQLite file
in WAL mode: each commit is atomic, and with `synchronous=NORMAL` a committed row survives the
process being SIGKILLed at any point (only an OS crash or power loss can roll back the newest
commits, which would then be asked again, never half-read). Besides the answers it keeps:
- a journal of every HTTP attempt (paid or not), so the budget counts money spent by earlier runs
  and a killed run's paid calls still reach lineage when the next run adopts them;
- the Batch API jobs, recorded before polling, so a rerun resumes polling instead of resubmitting;
- leases: the call a live run is sending right now. Two runs sharing one home (same corpus, both
  cold) would otherwise both miss the cache and both pay; the first to claim a key (in a
  `BEGIN IMMEDIATE` transaction, so claims are serialised across processes) sends it, the other
  waits for its answer. A lease dies with its run (pid gone on this host) or after `stale_after_s`.
Failed calls are journaled but never stored as answers.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tinymars.artifacts import hash_json

SCHEMA = """
CREATE TABLE IF NOT EXISTS answers (
    call_key TEXT PRIMARY KEY, model TEXT NOT NULL, answer TEXT NOT NULL, created_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS invocations (
    invocation TEXT PRIMARY KEY, pid INTEGER, host TEXT, started_at REAL, finished INTEGER DEFAULT 0,
    adopted_by TEXT);
CREATE TABLE IF NOT EXISTS attempts (
    id INTEGER PRIMARY KEY AUTOINCREMENT, invocation TEXT NOT NULL, call_key TEXT, price_usd REAL NOT NULL,
    record TEXT NOT NULL, reported INTEGER DEFAULT 0);
CREATE INDEX IF NOT EXISTS attempts_key ON attempts (call_key);
CREATE TABLE IF NOT EXISTS leases (
    call_key TEXT PRIMARY KEY, invocation TEXT NOT NULL, pid INTEGER, host TEXT, claimed_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS batches (
    batch_id TEXT PRIMARY KEY, input_file_id TEXT, call_keys TEXT NOT NULL, status TEXT NOT NULL,
    submitted_at REAL NOT NULL);
"""


def call_key(model: str, messages: list[dict[str, str]], params: dict[str, Any], seed: int | None) -> str:
    """The identity of a call: endpoint model, messages, sampling parameters and seed (nothing else)."""
    return hash_json({"model": model, "messages": messages, "params": params, "seed": seed})


_RUNNING: set[str] = set()  # invocations of this process that are still generating


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class CallCache:
    """Answers, the attempt journal and batch jobs in one SQLite file (safe across processes)."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._con = sqlite3.connect(self.path, timeout=60, isolation_level=None, check_same_thread=False)
        self._con.execute("PRAGMA journal_mode=WAL")
        self._con.execute("PRAGMA synchronous=NORMAL")
        self._con.execute("PRAGMA busy_timeout=60000")
        with self._lock:
            self._con.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._con.close()

    def __enter__(self) -> CallCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _commit(self, sql: str, params: Iterable[Any] = ()) -> None:
        with self._lock:
            self._con.execute(sql, tuple(params))

    def _rows(self, sql: str, params: Iterable[Any] = ()) -> list[tuple]:
        with self._lock:
            return self._con.execute(sql, tuple(params)).fetchall()

    # ------------------------------------------------------------ answers
    def get(self, key: str) -> dict[str, Any] | None:
        rows = self._rows("SELECT answer FROM answers WHERE call_key = ?", [key])
        return json.loads(rows[0][0]) if rows else None

    def put(self, key: str, model: str, answer: dict[str, Any],
            journal: tuple[str, dict[str, Any]] | None = None) -> None:
        """Store an answer, and its attempt's journal record if given, in one transaction (committed when
        this returns). The first answer stored for a key wins."""
        with self._lock:
            self._con.execute("BEGIN IMMEDIATE")
            try:
                self._con.execute(
                    "INSERT OR IGNORE INTO answers (call_key, model, answer, created_at) VALUES (?, ?, ?, ?)",
                    [key, model, json.dumps(answer, sort_keys=True), time.time()],
                )
                if journal is not None:
                    self._con.execute(*self._journal_sql(*journal))
                self._con.execute("DELETE FROM leases WHERE call_key = ?", [key])
                self._con.execute("COMMIT")
            except BaseException:
                self._con.execute("ROLLBACK")
                raise

    def claim(self, key: str, invocation: str, stale_after_s: float) -> tuple[str, dict[str, Any] | None]:
        """Whether `invocation` may send this call now: ("answer", stored answer), ("claimed", None) — the
        lease is ours until `put` or `unlease` — or ("held", None): a live run is sending it; ask again soon."""
        with self._lock:
            self._con.execute("BEGIN IMMEDIATE")
            try:
                row = self._con.execute("SELECT answer FROM answers WHERE call_key = ?", [key]).fetchone()
                if row is not None:
                    return "answer", json.loads(row[0])
                lease = self._con.execute("SELECT invocation, pid, host, claimed_at FROM leases WHERE call_key = ?",
                                          [key]).fetchone()
                if lease is not None and lease[0] != invocation and time.time() - lease[3] < stale_after_s \
                        and self._alive(lease[0], {lease[0]: (lease[1], lease[2])}):
                    return "held", None
                self._con.execute(
                    "INSERT OR REPLACE INTO leases (call_key, invocation, pid, host, claimed_at)"
                    " VALUES (?, ?, ?, ?, ?)",
                    [key, invocation, os.getpid(), socket.gethostname(), time.time()])
                return "claimed", None
            finally:
                self._con.execute("COMMIT")

    def unlease(self, key: str, invocation: str) -> None:
        """Give a claimed call back unanswered (it failed): the next run to claim it may send it."""
        self._commit("DELETE FROM leases WHERE call_key = ? AND invocation = ?", [key, invocation])

    def keys(self) -> set[str]:
        return {r[0] for r in self._rows("SELECT call_key FROM answers")}

    # ------------------------------------------------------------ attempt journal
    def start_invocation(self) -> str:
        """Register this process's generation run; its journal is adopted by a later run if it dies."""
        inv = uuid.uuid4().hex
        _RUNNING.add(inv)
        self._commit(
            "INSERT INTO invocations (invocation, pid, host, started_at) VALUES (?, ?, ?, ?)",
            [inv, os.getpid(), socket.gethostname(), time.time()],
        )
        return inv

    def journal(self, invocation: str, record: dict[str, Any]) -> None:
        """Append one attempt's lineage record (committed when this returns)."""
        self._commit(*self._journal_sql(invocation, record))

    @staticmethod
    def _journal_sql(invocation: str, record: dict[str, Any]) -> tuple[str, list[Any]]:
        return ("INSERT INTO attempts (invocation, call_key, price_usd, record) VALUES (?, ?, ?, ?)",
                [invocation, record.get("call_key"), float(record.get("price_usd") or 0.0), json.dumps(record)])

    def release_invocation(self, invocation: str) -> None:
        """This run ends without handing its journal to lineage: a retry will adopt it (and what it adopted)."""
        _RUNNING.discard(invocation)
        self._commit("UPDATE invocations SET adopted_by = NULL WHERE adopted_by = ?", [invocation])
        self._commit("DELETE FROM leases WHERE invocation = ?", [invocation])

    def finish_invocation(self, invocation: str) -> None:
        """Mark a run's journal, and the journals it adopted, as handed to lineage."""
        _RUNNING.discard(invocation)
        with self._lock:
            self._con.execute("BEGIN IMMEDIATE")
            done = [invocation] + [r[0] for r in self._con.execute(
                "SELECT invocation FROM invocations WHERE adopted_by = ?", [invocation]).fetchall()]
            for inv in done:
                self._con.execute("UPDATE attempts SET reported = 1 WHERE invocation = ?", [inv])
                self._con.execute("UPDATE invocations SET finished = 1 WHERE invocation = ?", [inv])
            self._con.execute("DELETE FROM leases WHERE invocation = ?", [invocation])
            self._con.execute("COMMIT")

    def adopt_orphans(self, adopter: str) -> list[dict[str, Any]]:
        """Unreported attempts of runs that ended without handing them to lineage (killed, or released for
        a retry), claimed by `adopter`; they count as reported once the adopter finishes."""
        rows = {inv: (pid, host) for inv, pid, host in self._rows("SELECT invocation, pid, host FROM invocations")}
        pending = self._rows("SELECT invocation, adopted_by FROM invocations WHERE finished = 0 AND invocation != ?",
                             [adopter])
        orphans = [inv for inv, by in pending
                   if not self._alive(inv, rows) and (by is None or not self._alive(by, rows))]
        out: list[dict[str, Any]] = []
        for inv in orphans:
            self._commit("UPDATE invocations SET adopted_by = ? WHERE invocation = ?", [adopter, inv])
            out += [json.loads(r[0]) for r in self._rows(
                "SELECT record FROM attempts WHERE invocation = ? AND reported = 0 ORDER BY id", [inv])]
        return out

    @staticmethod
    def _alive(invocation: str, rows: dict[str, tuple[int, str]]) -> bool:
        """Still generating: in this process and running, or in another live process on this host."""
        if invocation not in rows:
            return False
        pid, host = rows[invocation]
        if host != socket.gethostname():
            return True  # cannot tell; never adopt another host's journal
        if int(pid) == os.getpid():
            return invocation in _RUNNING
        return _pid_alive(int(pid))

    def spent_on(self, keys: Iterable[str]) -> float:
        """Money every run has spent on these calls (all attempts, answered or not)."""
        wanted = set(keys)
        with self._lock:
            rows = self._con.execute("SELECT call_key, price_usd FROM attempts WHERE price_usd > 0").fetchall()
        return sum(price for key, price in rows if key in wanted)

    # ------------------------------------------------------------ batch jobs
    def save_batch(self, batch_id: str, input_file_id: str, keys: list[str]) -> None:
        self._commit(
            "INSERT OR REPLACE INTO batches (batch_id, input_file_id, call_keys, status, submitted_at)"
            " VALUES (?, ?, ?, 'submitted', ?)",
            [batch_id, input_file_id, json.dumps(keys), time.time()],
        )

    def open_batches(self) -> list[dict[str, Any]]:
        rows = self._rows(
            "SELECT batch_id, input_file_id, call_keys FROM batches WHERE status = 'submitted' ORDER BY submitted_at")
        return [{"batch_id": b, "input_file_id": f, "call_keys": json.loads(k)} for b, f, k in rows]

    def close_batch(self, batch_id: str, status: str) -> None:
        self._commit("UPDATE batches SET status = ? WHERE batch_id = ?", [status, batch_id])
