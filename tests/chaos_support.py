"""Kill-anywhere machinery shared by tests/test_chaos.py, tests/test_corruption.py and bench/chaos.py.

`tinymars run` pays ~5 s of imports (torch, prefect) before any stage starts; at 20+ kills per
test that is most of the budget. A `Zygote` imports everything once and forks a fresh process per
run that calls `app.cli.main(["run", ...])` with its output in a log file: a real run process
(its own pid, Prefect flow run, trainer children, lineage writes) that the caller SIGKILLs like a
user would. The runs talk to one Prefect API (the test harness's) instead of each starting a server.
"""

from __future__ import annotations

import json
import os
import random
import re
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PROFILE = "chaos"


# ---- the zygote (runs in its own process) ---------------------------------------------------------
def _serve() -> None:
    """Read {"argv", "log"} lines on stdin, fork a run per line, report {"pid"} and later {"exit", "code"}."""
    import sentence_transformers  # noqa: F401

    import flows.iteration  # noqa: F401  (the expensive imports, done once)
    from app.cli import main

    children: set[int] = set()
    out = sys.stdout
    out.write(json.dumps({"ready": os.getpid()}) + "\n")
    out.flush()
    while True:
        ready, _, _ = select.select([sys.stdin], [], [], 0.02)
        if ready:
            line = sys.stdin.readline()
            if not line:  # the test process is gone: take the runs with us
                for pid in children:
                    _kill(pid)
                return
            req = json.loads(line)
            out.flush()
            pid = os.fork()
            if pid == 0:
                _child(req, main)
            children.add(pid)
            out.write(json.dumps({"pid": pid}) + "\n")
            out.flush()
        while children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            children.discard(pid)
            out.write(json.dumps({"exit": pid, "code": os.waitstatus_to_exitcode(status)}) + "\n")
            out.flush()


def _child(req: dict[str, Any], main: Any) -> None:
    code = 1
    try:
        log = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        code = main(req["argv"])
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class Zygote:
    """The test-side handle: spawn runs, wait for them, kill them."""

    def __init__(self, env: dict[str, str]):
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.chaos_support"], cwd=ROOT, env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=1)
        self.exits: dict[int, int] = {}
        self._spawned: list[int] = []
        self._cv = threading.Condition()
        self._ready = False
        threading.Thread(target=self._read, daemon=True).start()
        with self._cv:
            if not self._cv.wait_for(lambda: self._ready or self.proc.poll() is not None, timeout=180):
                raise RuntimeError("the run zygote did not start")
        if not self._ready:
            raise RuntimeError("the run zygote died while importing")

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            msg = json.loads(line)
            with self._cv:
                if "ready" in msg:
                    self._ready = True
                elif "pid" in msg:
                    self._spawned.append(msg["pid"])
                elif "exit" in msg:
                    self.exits[msg["exit"]] = msg["code"]
                self._cv.notify_all()

    def spawn(self, argv: list[str], log: Path) -> int:
        assert self.proc.stdin is not None
        with self._cv:
            n = len(self._spawned)
            self.proc.stdin.write(json.dumps({"argv": argv, "log": str(log)}) + "\n")
            self.proc.stdin.flush()
            self._cv.wait_for(lambda: len(self._spawned) > n, timeout=30)
            return self._spawned[n]

    def wait(self, pid: int, timeout: float = 600) -> int:
        with self._cv:
            if not self._cv.wait_for(lambda: pid in self.exits, timeout=timeout):
                _kill(pid)
                raise TimeoutError(f"run {pid} did not finish in {timeout:.0f}s")
            return self.exits[pid]

    def done(self, pid: int) -> bool:
        with self._cv:
            return pid in self.exits

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()  # the zygote kills its runs and exits
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def run_env(api_url: str) -> dict[str, str]:
    """The environment every run gets: one Prefect API, quiet, single-threaded, offline, and the test
    teacher's key (so the teacher-backed runs of tests/test_concurrent.py fork from the same zygote)."""
    from tests.teacher_support import FAKE_KEY, KEY_ENV

    return {**os.environ, KEY_ENV: FAKE_KEY, "PREFECT_API_URL": api_url, "PREFECT_LOGGING_LEVEL": "INFO",
            "PREFECT_LOGGING_TO_API_ENABLED": "false",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}


_shared: dict[str, Any] = {}


def shared_zygote(api_url: str) -> Zygote:
    """One zygote per test process (chaos, corruption and concurrency use it: the imports are paid once);
    it exits with the process at the latest."""
    if "zygote" not in _shared:
        import atexit

        _shared["zygote"] = Zygote(run_env(api_url))
        atexit.register(_shared["zygote"].close)
    return _shared["zygote"]


def complete_home(zygote: Zygote, base: Path) -> Path:
    """A home holding one uninterrupted run of the profile (built once per test process; copy before changing)."""
    if "home" not in _shared:
        home = base / "reference"
        run_to_end(zygote, home, base / "reference.log")
        _shared["home"] = home
    return _shared["home"]


def run_argv(home: Path, *extra: str) -> list[str]:
    return ["run", "--profile", PROFILE, "--home", str(home), *extra]


def run_to_end(zygote: Zygote, home: Path, log: Path, *extra: str) -> str:
    pid = zygote.spawn(run_argv(home, *extra), log)
    code = zygote.wait(pid)
    text = log.read_text()
    if code != 0:
        raise AssertionError(f"run exited {code}:\n{text[-4000:]}")
    return text


# ---- processes --------------------------------------------------------------------------------------
def descendants(pid: int) -> set[int]:
    """Every live process below `pid` (by parent links in /proc)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2:].split()
        parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, pp in parents.items() if pp in frontier} - found
        found |= frontier
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def wait_gone(pids: set[int], timeout: float = 15.0) -> set[int]:
    """Wait for these processes to end; return the ones still alive after `timeout`."""
    end = time.monotonic() + timeout
    while (left := {p for p in pids if alive(p)}) and time.monotonic() < end:
        time.sleep(0.05)
    return left


# ---- the store --------------------------------------------------------------------------------------
def copy_home(src: Path, dst: Path) -> Path:
    """A working copy of a home: its files, with the lineage's artifact paths pointing into the copy
    (so a test that damages or reads an artifact through lineage touches the copy, never the original)."""
    import duckdb

    shutil.copytree(src, dst)
    con = duckdb.connect(str(dst / "lineage.duckdb"))
    try:
        con.execute("UPDATE artifacts SET path = ? || substr(path, ?) WHERE starts_with(path, ?)",
                    [str(dst), len(str(src)) + 1, str(src) + "/"])
    finally:
        con.close()
    return dst


def temporaries(home: Path) -> set[str]:
    """Build folders in the artifact store (stage/.tmp-*): left behind only by a kill mid-build."""
    root = home / "artifacts"
    return {f"{p.parent.name}/{p.name}" for p in root.glob("*/.tmp-*")} if root.exists() else set()


def final_artifacts(home: Path) -> dict[str, dict[str, Any]]:
    """Stage name -> {key, content_hash, path} of the newest completed run's stages, from lineage."""
    import duckdb

    con = duckdb.connect(str(home / "lineage.duckdb"), read_only=True)
    try:
        run = con.execute("select run_id from runs where status = 'completed' order by started_at desc limit 1"
                          ).fetchone()[0]
        rows = con.execute("select s.name, s.cache_key, s.artifact_hash, a.path from stages s join artifacts a "
                           "on a.content_hash = s.artifact_hash where s.run_id = ? and s.status = 'completed'",
                           [run]).fetchall()
    finally:
        con.close()
    return {name: {"key": key, "content_hash": h, "path": path} for name, key, h, path in rows}


def stable_files(folder: Path) -> dict[str, str]:
    """File -> sha256 of an artifact folder, without its volatile (wall-clock) files."""
    manifest = json.loads((Path(folder) / "manifest.json").read_text())
    skip = set(manifest.get("volatile", []))
    return {name: info["sha256"] for name, info in manifest["files"].items() if name not in skip}


def lineage_stages(home: Path) -> list[dict[str, Any]]:
    import duckdb

    con = duckdb.connect(str(home / "lineage.duckdb"), read_only=True)
    try:
        cur = con.execute("select run_id, stage, name, cache_key, cache_hit, status, artifact_hash, error "
                          "from stages order by started_at")
        cols = [d[0] for d in cur.description]
        return [dict(zip(cols, row, strict=True)) for row in cur.fetchall()]
    finally:
        con.close()


# ---- kill planning ----------------------------------------------------------------------------------
BUILDING = re.compile(r"\[([a-z]+)(?::[\w-]+)?\] (?:building|forced rebuild)")


@dataclass
class KillPoint:
    """Kill the run `delay_s` after the first sign that `stage` is being built (its temp folder or log line)."""

    stage: str
    delay_s: float
    trigger: str  # "tmp" (the build folder appears), "log" (the stage's "building" line), "step" (a train step line)


@dataclass
class Outcome:
    point: KillPoint
    landed_in: str | None  # the stage whose build folder the kill abandoned (None: between stages)
    code: int
    seconds: float
    checkpoint_steps: list[int] = field(default_factory=list)


def stage_seconds(home: Path) -> dict[str, float]:
    """Stage -> build seconds in the home's newest completed run (the longest of a stage's models)."""
    import duckdb

    con = duckdb.connect(str(home / "lineage.duckdb"), read_only=True)
    try:
        rows = con.execute("select s.stage, max(s.duration_s) from stages s join (select run_id from runs where "
                           "status = 'completed' order by started_at desc limit 1) r using (run_id) "
                           "group by s.stage").fetchall()
    finally:
        con.close()
    return {stage: float(seconds or 0.0) for stage, seconds in rows}


def plan(seed: int, stages: list[str], total: int, seconds: dict[str, float]) -> list[KillPoint]:
    """`total` kill points, at least one per stage, in pipeline order, with seeded triggers and delays.

    Delays are drawn within the first half of the stage's build time in an uninterrupted run (`seconds`), so
    a kill lands inside the stage it aims at on a fast or a slow machine alike. Extra points go preferably
    to the long stages (training, embedding, generation), where there is more to hit.
    """
    rng = random.Random(seed)
    weight = {"train": 3, "generate": 2, "channels": 2}
    pool = [s for s in stages for _ in range(weight.get(s, 1))]
    rng.shuffle(pool)
    extra = [pool[i % len(pool)] for i in range(max(0, total - len(stages)))]
    points = []
    for stage in stages:
        half = 0.5 * seconds.get(stage, 0.0)
        for i in range(1 + extra.count(stage)):
            if stage == "train" and i == 0:  # one kill mid-training
                trigger, delay = "step", rng.uniform(0.0, 0.5)
            elif stage == "train":  # the others while the trainer starts, loads or resumes
                trigger, delay = "log", rng.uniform(0.0, min(3.0, half))
            else:
                trigger, delay = rng.choice(["tmp", "log"]), rng.uniform(0.0, half)
            points.append(KillPoint(stage, round(delay, 3), trigger))
    return points


def kill_at(zygote: Zygote, home: Path, log: Path, point: KillPoint, order: list[str],
            extra: tuple[str, ...] = (), timeout: float = 300.0) -> Outcome:
    """Start a run, SIGKILL it at `point`, check that none of its processes survive; say where it landed."""
    before = temporaries(home)
    t0 = time.monotonic()
    pid = zygote.spawn(run_argv(home, *extra), log)
    seen_at = None
    family: set[int] = set()
    while not zygote.done(pid) and time.monotonic() - t0 < timeout:
        family |= descendants(pid)
        if seen_at is None and _triggered(home, log, point, before, order):
            seen_at = time.monotonic()
        if seen_at is not None and time.monotonic() - seen_at >= point.delay_s:
            family |= descendants(pid)
            _kill(pid)
            break
        time.sleep(0.002)
    code = zygote.wait(pid, timeout=60)
    left = wait_gone(family)
    if left:
        raise AssertionError(f"processes {sorted(left)} outlived the killed run {pid}")
    abandoned = sorted(temporaries(home) - before)
    steps = sorted(int(p.name.split("-")[1]) for p in home.glob("checkpoints/*/ckpt/step-*"))
    return Outcome(point, abandoned[0].split("/")[0] if abandoned else None, code, time.monotonic() - t0, steps)


def _triggered(home: Path, log: Path, point: KillPoint, before: set[str], order: list[str]) -> bool:
    """The point's own sign, or a later stage already building (its stage finished in an earlier run)."""
    if point.trigger == "tmp" and any(t.startswith(point.stage + "/") for t in temporaries(home) - before):
        return True
    try:
        text = log.read_text()
    except OSError:
        return False
    building = [m.group(1) for m in BUILDING.finditer(text)]
    if any(order.index(s) > order.index(point.stage) for s in building if s in order):
        return True
    if point.trigger == "step":
        return re.search(rf"\[{point.stage}(?::[\w-]+)?\] step \d+/", text) is not None
    return point.trigger == "log" and point.stage in building


if __name__ == "__main__":
    _serve()
