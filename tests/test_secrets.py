"""The teacher's API key reaches nothing a run writes or prints.

A whole teacher-backed iteration runs as a real `tinymars run` process with a fresh canary key in the
environment variable the profile names; then every file under its home, its own PREFECT_HOME and
temporary folder, the Prefect API's database (flow-run logs, states, parameters), its stdout/stderr
and every value in the lineage tables (DuckDB compresses strings on disk, so a byte scan is not enough)
are searched for the key, its last 8 characters and its base64 forms. The error path too: a server that
answers 401 echoing the (wrong) key it was given.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml

from deploy.local import BIN
from tests.openai_server import FakeOpenAI
from tests.teacher_support import (
    KEY_ENV,
    ROOT,
    canary_key,
    duckdb_text,
    files_containing,
    leak_forms,
    prefect_database,
    profile_data,
)

pytestmark = pytest.mark.slow


def _run(tmp: Path, key: str, profile: Path, *extra: str) -> tuple[int, str]:
    """`tinymars run` in its own process, with its own PREFECT_HOME and TMPDIR (both scanned after)."""
    from prefect.settings import PREFECT_API_URL

    for d in ("prefect-home", "tmp"):
        (tmp / d).mkdir(exist_ok=True)
    env = {**os.environ, KEY_ENV: key, "PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_LOGGING_LEVEL": "DEBUG",
           "PREFECT_HOME": str(tmp / "prefect-home"), "TMPDIR": str(tmp / "tmp"), "OMP_NUM_THREADS": "1"}
    with open(tmp / "output.log", "ab") as out:
        code = subprocess.run([str(BIN / "tinymars"), "run", "--profile", str(profile), "--home", str(tmp / "home"),
                               *extra], env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, timeout=600).returncode
    return code, (tmp / "output.log").read_text(errors="replace")


def _scan_roots(tmp: Path) -> list[Path]:
    db = prefect_database()
    return [tmp, db.parent, Path(os.environ["PREFECT_HOME"])]


def test_a_teacher_iteration_leaves_its_key_nowhere(prefect_harness, tmp_path):
    key, wrong = canary_key(), canary_key()
    profile = tmp_path / "teacher.yaml"
    with FakeOpenAI(api_key=key) as fake:
        profile.write_text(yaml.safe_dump(profile_data(fake.base_url)))
        code, output = _run(tmp_path, key, profile)
        assert code == 0, output[-4000:]
        assert fake.outcomes["ok"] > 0 and fake.outcomes["401"] == 0  # the key really was sent, and accepted

        # the error path: the server echoes the wrong key in its 401 body; what we print must not
        code, output = _run(tmp_path, wrong, profile, "--set", "corpus.seed=4", "--only", "corpus")
        assert fake.outcomes["401"] >= 1
    assert code == 1 and "rejected the key in $TINYMARS_TEST_TEACHER_KEY" in output and "401" in output

    # the scan reads what the runs wrote: artifacts of every stage, the lineage database, Prefect's logs
    roots = _scan_roots(tmp_path)
    lineage = tmp_path / "home" / "lineage.duckdb"
    assert len(list((tmp_path / "home" / "artifacts").glob("*/*/manifest.json"))) >= 5
    lineage_text = duckdb_text(lineage)
    assert "gpt-4o-mini" in lineage_text and "auth_error" in lineage_text
    assert files_containing(prefect_database().parent, ["rejected the key in $TINYMARS_TEST_TEACHER_KEY"])
    needles = leak_forms(key) + leak_forms(wrong)
    for root in roots:
        assert files_containing(root, needles) == [], f"the key leaked under {root}"
    assert not any(n in output for n in needles)
    assert not any(n in lineage_text for n in needles)


def test_the_scan_finds_a_key_however_it_is_written(tmp_path):
    """The scan above can fail: plain, tail, base64 (any alignment, URL-safe too) and UTF-16 are all found."""
    import base64

    key = canary_key()
    blobs = {"plain": key.encode(), "tail": b"...%s" % key[-8:].encode(), "utf16": key.encode("utf-16-le")}
    for prefix in range(3):
        raw = b"Bearer:" + b"x" * prefix + key.encode() + b"\n"
        blobs[f"b64-{prefix}"] = base64.b64encode(raw)
        blobs[f"urlsafe-{prefix}"] = base64.urlsafe_b64encode(raw)
    for name, data in blobs.items():
        (tmp_path / name).write_bytes(b"header " + data + b" trailer")
    (tmp_path / "clean").write_bytes(base64.b64encode(b"nothing to see " * 10))
    hits = files_containing(tmp_path, leak_forms(key))
    assert sorted(Path(h).name for h in hits) == sorted(blobs)
