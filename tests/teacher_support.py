"""Shared by the teacher tests: a profile whose teacher is the loopback server, a recognisable fake key,
and a scan for that key in everything a run leaves behind."""

from __future__ import annotations

import contextlib
import copy
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml

from corpus.call_cache import call_key
from corpus.openai_teacher import TeacherRequest, estimate_prompt_tokens
from tinymars.profile import Profile, validate_profile

ROOT = Path(__file__).resolve().parents[1]
FAKE_KEY = "sk-test-TINYMARS-Zq8vX2pL9mN4rT7yW1kJ"
KEY_ENV = "TINYMARS_TEST_TEACHER_KEY"
FAST = {"timeout_s": 0.3, "backoff_s": 0.005, "backoff_max_s": 0.02, "max_concurrency": 4}


def profile_data(base_url: str, prompts: int = 4, conflicts: int = 1, seed: int = 3, **teacher: Any) -> dict:
    """The `tiny` profile with an openai teacher at `base_url` (fast retries, gpt-4o-mini prices)."""
    data = yaml.safe_load((ROOT / "tinymars" / "profiles" / "tiny.yaml").read_text())
    data = copy.deepcopy(data)
    data["name"] = "teacher-test"
    data["corpus"] = {
        "teacher": {"kind": "openai", "base_url": base_url, "model": "gpt-4o-mini", "api_key_env": KEY_ENV,
                    **FAST, **teacher},
        "prompts_per_capability": prompts, "conflict_prompts_per_capability": conflicts,
        "heldout_fraction": 0.25, "seed": seed,
    }
    return data


def make_profile(base_url: str, **kw: Any) -> Profile:
    return validate_profile(profile_data(base_url, **kw))


def word_requests(n: int, tag: str = "") -> list[TeacherRequest]:
    """n distinct memory-style requests the loopback server answers with `Rex<tag><i> first: ...`."""
    out = []
    for i in range(n):
        messages = [{"role": "system", "content": "You write targets."},
                    {"role": "user", "content": f"Mention at least one of these words: Rex{tag}{i}, beagle.\n"
                                                "Do not use any of these words: cat."}]
        out.append(TeacherRequest(call_key("gpt-4o-mini", messages, {}, 0), "memory", messages, 0,
                                  estimate_prompt_tokens(messages)))
    return out


def canary_key() -> str:
    """A fresh recognisable fake key; its random tail is mixed-case, so it cannot turn up in a hex hash."""
    import random
    import string

    return "sk-test-LEAKCANARY-" + "".join(random.SystemRandom().choices(string.ascii_letters + string.digits, k=24))


def leak_forms(secret: str) -> list[str]:
    """What a leak of `secret` can look like: itself, its last 8 characters, and its base64 (standard and
    URL-safe) at each of the three byte alignments it can have inside a longer encoded blob (the few
    characters at either end that also depend on the neighbouring bytes are left out)."""
    import base64

    forms = [secret, secret[-8:]]
    for pad, skip in ((0, 0), (1, 2), (2, 3)):
        encoded = base64.b64encode(b"\0" * pad + secret.encode()).decode()[skip:-4]
        forms += [encoded, encoded.replace("+", "-").replace("/", "_")]
    return list(dict.fromkeys(forms))


def duckdb_text(path: Path) -> str:
    """Every value of every table of a DuckDB file as text: DuckDB compresses strings on disk (FSST,
    dictionaries), so a byte scan of the file alone could miss a leaked key."""
    import duckdb

    with duckdb.connect(str(path), read_only=True) as con:
        tables = [t for (t,) in con.execute("SELECT table_name FROM information_schema.tables").fetchall()]
        return "\n".join(str(con.execute(f'SELECT * FROM "{t}"').fetchall()) for t in tables)


def prefect_database() -> Path:
    """The SQLite file of the Prefect API in use (the session harness's, in tests)."""
    import prefect.settings

    url = str(prefect.settings.PREFECT_SERVER_DATABASE_CONNECTION_URL.value())
    return Path(url.split(":///", 1)[1])


def files_containing(root: Path, needles: list[str]) -> list[str]:
    """Every file under `root` whose bytes contain one of the needles (text or UTF-16, as SQLite may store)."""
    hits = []
    patterns = [n.encode() for n in needles] + [n.encode("utf-16-le") for n in needles]
    for f in sorted(Path(root).rglob("*")):
        if f.is_file():
            data = f.read_bytes()
            if any(p in data for p in patterns):
                hits.append(str(f))
    return hits


LOAD_PROMPTS = 667  # 15 teacher calls per prompt across the six capabilities: 667 -> 10,005 calls
LOAD_SERVER = {"fault_rate": 0.05, "timeout_sleep_s": 3.5}  # 5% faults: 429 / 500 / timeout / malformed
# a generous client timeout: at high concurrency on a small machine a healthy answer can take a second,
# and a spurious client timeout on an answer the server billed would be a second paid call
LOAD_TEACHER = {"max_concurrency": 32, "timeout_s": 3.0, "max_retries": 8}


def load_profile(base_url: str, prompts: int = LOAD_PROMPTS) -> Profile:
    """A corpus of 15 x `prompts` teacher calls (selection and register, no conflict prompts).

    The loopback server's answers are templated from the request's words, so held-out and train targets
    repeat: the split-overlap limits are lifted here (this corpus tests ledgers under faults, not content)."""
    data = profile_data(base_url, prompts=prompts, conflicts=0, **LOAD_TEACHER)
    data["corpus"].update(max_exact_duplicate_targets=10**9, max_near_duplicate_rate=1.0)
    return validate_profile(data)


def load_calls(prompts: int = LOAD_PROMPTS) -> int:
    return 15 * prompts  # selection: 3 capabilities x 3 rows; register: 3 capabilities x 2 rows


@contextlib.contextmanager
def server_process(api_key: str | None = None, fault_rate: float = 0.0,
                   timeout_sleep_s: float = 1.0) -> Iterator[tuple[str, Callable[[], dict[str, Any]]]]:
    """The loopback server in its own process (its own GIL: the client keeps a core to itself under load);
    yields its base URL and a function returning its counts (outcomes, billed answers per key, requests)."""
    import httpx

    env = {k: v for k, v in os.environ.items() if k != "FAKE_OPENAI_KEY"}
    if api_key:
        env["FAKE_OPENAI_KEY"] = api_key
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "openai_server.py"), "--latency", "0",
                             "--fault-rate", str(fault_rate), "--timeout-sleep", str(timeout_sleep_s)],
                            stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        base_url = proc.stdout.readline().strip()
        assert base_url.startswith("http://127.0.0.1:"), f"the loopback server did not start: {base_url!r}"
        yield base_url, lambda: httpx.get(f"{base_url}/_stats", timeout=30).json()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def teacher_gate_off(monkeypatch: Any) -> None:
    """Corpus tasks called directly (outside a flow) skip the Prefect global-concurrency gate (see the
    `no_teacher_gate` fixture in tests/conftest.py for why)."""
    import contextlib

    import tasks.corpus

    monkeypatch.setattr(tasks.corpus, "teacher_gate", contextlib.nullcontext)
