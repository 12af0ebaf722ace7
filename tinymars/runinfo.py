"""Who ran what: run ids, the project's code version and git state, recorded on every run."""

from __future__ import annotations

import secrets
import subprocess
from datetime import UTC, datetime
from functools import cache
from pathlib import Path

from tinymars.artifacts import code_version

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("app", "tinymars", "flows", "tasks", "models", "corpus", "scorers")


def new_run_id() -> str:
    return datetime.now(UTC).strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)


@cache
def project_code_version() -> str:
    return code_version(ROOT / p for p in PACKAGES)


@cache
def git_state() -> tuple[str | None, bool | None]:
    """(HEAD sha, dirty) of the checkout the code runs from, or (None, None) outside git."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
            text=True, timeout=10, check=True,
        ).stdout.strip()
        return sha, bool(dirty)
    except (OSError, subprocess.SubprocessError):
        return None, None
