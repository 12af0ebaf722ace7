"""Kill anywhere: SIGKILL `tinymars run` at seeded points spread over every stage, rerun, and end with
exactly the artifacts of an uninterrupted run; no partial artifact is ever trusted, no process outlives a kill.

The seed is printed; TINYMARS_CHAOS_SEED reproduces a run, TINYMARS_CHAOS_KILLS sets the number of kill points.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import chaos_support as cs
from tinymars.artifacts import ArtifactCorrupt, verify
from tinymars.stages import ORDER

ROOT = Path(__file__).resolve().parents[1]
SEED = int(os.environ.get("TINYMARS_CHAOS_SEED", random.SystemRandom().randrange(1 << 31)))
KILLS = int(os.environ.get("TINYMARS_CHAOS_KILLS", "20"))


@pytest.fixture(scope="module")
def zygote(prefect_harness):
    from prefect.settings import PREFECT_API_URL

    return cs.shared_zygote(PREFECT_API_URL.value())


def test_kill_anywhere_then_rerun_gives_the_uninterrupted_artifacts(zygote, tmp_path, tmp_path_factory):
    print(f"chaos seed {SEED} (TINYMARS_CHAOS_SEED={SEED} reproduces it), {KILLS} kill points")
    chaos = tmp_path / "chaos"
    reference = cs.complete_home(zygote, tmp_path_factory.mktemp("complete"))
    expected = cs.final_artifacts(reference)
    seconds = cs.stage_seconds(reference)
    assert set(expected) >= {"corpus", "channels", "tokenizer", "pack", "generate", "score", "report"}

    stages = list(ORDER)
    outcomes = []
    for i, point in enumerate(cs.plan(SEED, stages, KILLS, seconds)):
        outcome = cs.kill_at(zygote, chaos, tmp_path / f"kill-{i:03d}.log", point, stages)
        outcomes.append(outcome)
        print(f"  kill {i:2d}: {point.stage:<9} {point.trigger:<4} +{point.delay_s:.3f}s -> exit {outcome.code}, "
              f"abandoned build of {outcome.landed_in or '-'}, checkpoints {outcome.checkpoint_steps}")
    final_log = cs.run_to_end(zygote, chaos, tmp_path / "final.log")

    killed = [o for o in outcomes if o.code == -signal.SIGKILL]
    assert len(killed) >= KILLS - 2, f"seed {SEED}: only {len(killed)} of {KILLS} runs were still going when killed"
    hit = {o.landed_in for o in killed} - {None}
    # a stage of well under a second may finish between the sign of its start and the kill; the rest must be hit
    fast = {s for s in stages if seconds.get(s, 0.0) < 0.5}
    assert hit >= set(stages) - fast - set(_absent(expected, stages)), (
        f"seed {SEED}: kills landed mid-build only in {sorted(hit)}")
    logs = [p.read_text() for p in sorted(tmp_path.glob("kill-*.log"))] + [final_log]
    assert any("resumed from" in text for text in logs), f"seed {SEED}: no kill landed between two checkpoints"

    # byte-identical: every final artifact, under the same key, with the same non-volatile files
    got = cs.final_artifacts(chaos)
    assert set(got) == set(expected)
    for name, ref in expected.items():
        assert got[name]["key"] == ref["key"], f"seed {SEED}: {name} ran under another key"
        assert got[name]["content_hash"] == ref["content_hash"], f"seed {SEED}: {name} differs from the reference"
        assert cs.stable_files(Path(got[name]["path"])) == cs.stable_files(Path(ref["path"]))

    # nothing partial was trusted: every published folder verifies, none was ever quarantined,
    # lineage never points at a build folder, and every cache hit names a folder that verifies
    published = [p for p in (chaos / "artifacts").glob("*/*") if not p.name.startswith(".")]
    for folder in published:
        try:
            verify(folder)
        except ArtifactCorrupt as exc:
            pytest.fail(f"seed {SEED}: a published artifact does not verify: {exc}")
    assert not list((chaos / "artifacts").glob("*/.corrupt-*")), f"seed {SEED}: a kill produced a corrupt artifact"
    rows = cs.lineage_stages(chaos)
    verified = {verify(f).content_hash for f in published}
    for row in rows:
        if row["cache_hit"]:
            assert row["artifact_hash"] in verified and not row["error"], row
    assert all(".tmp-" not in p and ".corrupt-" not in p for p in _lineage_paths(chaos))
    print(f"survived {len(killed)} kills; stages hit mid-build: {sorted(hit)}; {len(rows)} stage rows in lineage")


def _absent(expected: dict, stages: list[str]) -> list[str]:
    """Stages of ORDER that this profile does not run (no artifact in the reference)."""
    return [s for s in stages if not any(name.split(":")[0] == s for name in expected)]


def _lineage_paths(home: Path) -> list[str]:
    import duckdb

    con = duckdb.connect(str(home / "lineage.duckdb"), read_only=True)
    try:
        return [r[0] for r in con.execute("select path from artifacts").fetchall()]
    finally:
        con.close()


def test_sigkill_of_tinymars_run_stops_prefects_temporary_server(tmp_path):
    """No Prefect API configured: the CLI supervises a worker whose process group dies with it."""
    env = {k: v for k, v in cs.run_env("").items() if k != "PREFECT_API_URL"}
    env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "180"
    log = tmp_path / "run.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "app.cli", *cs.run_argv(tmp_path / "home")], cwd=ROOT,
                                env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        family: set[int] = set()
        end = time.monotonic() + 120
        while time.monotonic() < end and proc.poll() is None:
            family |= cs.descendants(proc.pid)
            if any(b"uvicorn" in _cmdline(p) for p in family):
                break
            time.sleep(0.05)
        servers = {p for p in family if b"uvicorn" in _cmdline(p)}
        assert servers, f"no temporary Prefect server was started:\n{log.read_text()[-3000:]}"
        family |= cs.descendants(proc.pid)
        proc.kill()
        proc.wait()
        left = cs.wait_gone(family)
        assert not left, f"processes {sorted(left)} (server {sorted(servers)}) outlived a SIGKILL of tinymars run"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""
