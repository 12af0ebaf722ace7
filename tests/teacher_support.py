"""Shared by the teacher tests: a profile whose teacher is the loopback server, a recognisable fake key,
and a scan for that key in everything a run leaves behind."""

from __future__ import annotations

import copy
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
