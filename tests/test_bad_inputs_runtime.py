"""Bad input battery, runtime half: inputs only a stage can judge (a corpus's characters, prompt lengths,
replay files, a teacher's answers, a full disk) fail that stage through the real CLI with a message that
names the input and the fix, exit 1, and leave every artifact of an earlier good run byte-identical;
the next good run then trusts nothing half-written and rebuilds nothing.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from app.cli import main
from tests.openai_server import FakeOpenAI
from tests.teacher_support import FAKE_KEY, KEY_ENV, profile_data
from tinymars.artifacts import sha256_file, verify
from tinymars.lineage import Lineage

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
UP_TO_PACK = ["corpus", "channels", "tokenizer", "pack"]


def _good_profile() -> dict:
    """`tiny` with numeric channels only: every stage up to pack runs for real, with no embedder to load."""
    data = yaml.safe_load((ROOT / "tinymars" / "profiles" / "tiny.yaml").read_text())
    data = copy.deepcopy(data)
    data["name"] = "bad-inputs"
    data["channels"]["enabled"] = {"affect": {"dim": 2}, "time": {"dim": 16}, "ethics": {"dim": 24}}
    return data


@pytest.fixture(scope="module")
def good(prefect_harness, tmp_path_factory) -> dict:
    """One good run up to the pack stage; every case below runs on its home."""
    root = tmp_path_factory.mktemp("bad-inputs")
    profile = root / "good.yaml"
    profile.write_text(yaml.safe_dump(_good_profile()))
    home = root / "home"
    assert main(["run", "--profile", str(profile), "--home", str(home), "--only", "pack"]) == 0
    return {"root": root, "profile": str(profile), "home": home, "before": _snapshot(home), "failed_runs": 0}


def _snapshot(home: Path) -> dict:
    """Every artifact file's sha256, and the lineage rows that describe artifacts."""
    files = {p.relative_to(home).as_posix(): sha256_file(p) for p in sorted((home / "artifacts").rglob("*"))
             if p.is_file()}
    lin = Lineage(home / "lineage.duckdb")
    counts = {t: lin.query(f"SELECT count(*) AS n FROM {t}")[0]["n"] for t in ("artifacts", "edges")}
    return {"files": files, "counts": counts}


def _run(capsys, good: dict, *argv: str, profile: str | None = None) -> str:
    """A failing `tinymars run` on the good home: exit 1, one clean error line, prior artifacts intact."""
    code = main(["run", "--profile", profile or good["profile"], "--home", str(good["home"]), *argv])
    err = capsys.readouterr().err
    assert code == 1, err
    lines = [line for line in err.splitlines() if line.startswith("tinymars: error: ")]
    assert len(lines) == 1 and lines[0].startswith("tinymars: error: run failed: "), err
    assert "Traceback" not in lines[0]
    assert _snapshot(good["home"]) == good["before"], "a failed run changed an earlier artifact or its lineage"
    assert not list((good["home"] / "artifacts").glob("*/.tmp-*")), "a half-built folder was left behind"
    last = Lineage(good["home"] / "lineage.duckdb").runs(1)[0]
    assert last["status"] == "failed"
    good["failed_runs"] += 1
    return lines[0]


def _replay(tmp: Path, name: str, data: bytes) -> list[str]:
    path = tmp / name
    path.write_bytes(data)
    return ["--only", "tokenizer", "--set", f"replay={{source: '{path}', tokens: 5000, share: 0.5}}"]


def test_vocab_larger_than_the_corpus_is_refused_before_work_and_by_the_stage(capsys, good) -> None:
    """`tinymars run` refuses it in preflight (exit 2, nothing started); a flow started around the CLI (a
    deployment) still meets the tokenizer stage's own check, which names the same fix."""
    from flows.iteration import iteration

    runs_before = len(Lineage(good["home"] / "lineage.duckdb").runs(100))
    code = main(["run", "--profile", good["profile"], "--home", str(good["home"]), "--only", "tokenizer",
                 "--set", "tokenizer.vocab_size=60000"])
    err = capsys.readouterr().err
    assert code == 2 and "tokenizer.vocab_size: 60000 is more than this corpus's text can support" in err, err
    assert len(Lineage(good["home"] / "lineage.duckdb").runs(100)) == runs_before  # refused before any run
    with pytest.raises(Exception, match="tokenizer.vocab_size: 60000 is larger than this corpus supports"):
        iteration(profile=good["profile"], home=str(good["home"]), overrides=["tokenizer.vocab_size=60000"],
                  only="tokenizer")
    assert _snapshot(good["home"]) == good["before"]
    good["failed_runs"] += 1


STAGE_CASES = {
    "vocab-too-small-for-corpus-chars": (["--only", "tokenizer", "--set", "tokenizer.vocab_size=280"],
                                         ["tokenizer.vocab_size: 280 is too small for this corpus: its characters and "
                                          "the reserved pieces need at least ", "raise tokenizer.vocab_size"]),
    "seq-len-shorter-than-prompts": (["--only", "pack", "--set", "pack.seq_len=16"],
                                     ["PackError: pack.seq_len: 16 is too short for a prompt of ",
                                      "raise pack.seq_len"]),
}


@pytest.mark.parametrize("case", list(STAGE_CASES))
def test_stage_rejects_profile_the_data_cannot_support(capsys, good, case):
    argv, expected = STAGE_CASES[case]
    line = _run(capsys, good, *argv)
    for phrase in expected:
        assert phrase in line, line


PREFLIGHT_REPLAY_CASES = {  # what a local file shows before any work: refused by `tinymars run` (exit 2)
    "replay-not-utf8": ("latin1.txt", "caf\xe9 au lait\n".encode("latin-1") * 3,
                        ["is not UTF-8 (byte 0xe9 at offset 3); re-save it as UTF-8"]),
    "replay-empty-file": ("empty.txt", b"", ["is empty; point it at a file with text rows or remove the replay"]),
    "replay-unknown-suffix": ("replay.xml", b"<a/>", ["has an unknown suffix; use one of"]),
}


@pytest.mark.parametrize("case", list(PREFLIGHT_REPLAY_CASES))
def test_bad_replay_file_is_refused_before_work(capsys, good, tmp_path, case):
    name, data, expected = PREFLIGHT_REPLAY_CASES[case]
    runs_before = len(Lineage(good["home"] / "lineage.duckdb").runs(100))
    assert main(["run", "--profile", good["profile"], "--home", str(good["home"]), *_replay(tmp_path, name, data)]) == 2
    err = capsys.readouterr().err
    assert "replay.source: " in err and str(tmp_path / name) in err, err
    for phrase in expected:
        assert phrase in err, err
    assert len(Lineage(good["home"] / "lineage.duckdb").runs(100)) == runs_before
    assert _snapshot(good["home"]) == good["before"]


REPLAY_CASES = {  # what only reading the stream shows: the tokenizer stage fails, naming the field
    "replay-only-blank-texts": ("blank.jsonl", b'{"text": ""}\n{"text": "   "}\n',
                                ["has no non-empty text in field 'text'"]),
    "replay-missing-text-field": ("body.jsonl", b'{"body": "hello"}\n',
                                  ["replay.text_field: 'text' is not a column of", "columns: body"]),
    "replay-malformed-jsonl": ("cut.jsonl", b'{"text": "fine"}\n{"text": "cut\n',
                               ["cannot read", "JSON"]),
}


@pytest.mark.parametrize("case", list(REPLAY_CASES))
def test_bad_replay_file(capsys, good, tmp_path, case):
    name, data, expected = REPLAY_CASES[case]
    line = _run(capsys, good, *_replay(tmp_path, name, data))
    assert "ReplayError: replay." in line and str(tmp_path / name) in line
    for phrase in expected:
        assert phrase in line, line


TEACHER_CASES = {
    "teacher-breaks-every-rule": ("bad", ["ValueError: corpus: the teacher's answers are unusable: ",
                                          "targets failed pre-flight",
                                          "check that corpus.teacher.model ('gpt-4o-mini')",
                                          "or raise corpus.teacher.resamples"]),
    "teacher-answers-html": ("html", ["TeacherUnavailable: teacher call for ", "the body is not JSON",
                                      "rerun to continue, or raise corpus.teacher.max_retries"]),
    "teacher-answers-no-choices": ("empty", ["empty_choices: the answer has no choices"]),
}


@pytest.mark.parametrize("case", list(TEACHER_CASES))
def test_teacher_returning_nonsense(capsys, good, tmp_path, monkeypatch, case):
    outcome, expected = TEACHER_CASES[case]
    monkeypatch.setenv(KEY_ENV, FAKE_KEY)
    with FakeOpenAI(fault_fn=lambda key, body: outcome) as fake:
        # a seed per case: the call cache in the shared home must not answer one case with another's replies
        seed = 10 + list(TEACHER_CASES).index(case)
        data = profile_data(fake.base_url, prompts=3, conflicts=0, resamples=0, max_retries=1, seed=seed)
        path = tmp_path / "teacher.yaml"
        path.write_text(yaml.safe_dump(data))
        line = _run(capsys, good, "--only", "corpus", profile=str(path))
    for phrase in expected:
        assert phrase in line, line
    assert FAKE_KEY not in line


def test_full_disk_fails_cleanly_and_keeps_nothing_half_written(good):
    """A file size limit in the child (RLIMIT_FSIZE, SIGXFSZ ignored so the write fails with EFBIG): the channels
    stage cannot write its matrices. Works as root and without mounting anything."""
    from prefect.settings import PREFECT_API_URL

    lineage_bytes = (good["home"] / "lineage.duckdb").stat().st_size
    limit = lineage_bytes + (2 << 20)  # room for lineage rows, not for ~8.6 MB of affect vectors
    channels_bytes = 132 * 16384 * 4
    assert limit < channels_bytes, f"lineage.duckdb is {lineage_bytes} bytes: the limit would not bite"

    def limited() -> None:
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "app.cli", "run", "--profile", good["profile"], "--home", str(good["home"]),
            "--only", "channels", "--set", "channels.enabled.affect.dim=16384"]
    out = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, preexec_fn=limited)
    assert out.returncode == 1, out.stderr[-3000:]
    line = out.stderr.strip().splitlines()[-1]
    assert line.startswith("tinymars: error: run failed: DiskFull: disk full or file size limit reached while "
                           f"writing {good['home'] / 'artifacts' / 'channels'}/.tmp-"), line
    assert "(building the channels artifact)" in line and "File too large" in line
    assert "free space there (or raise the limit) and rerun" in line
    good["failed_runs"] += 1
    assert _snapshot(good["home"]) == good["before"]
    assert not list((good["home"] / "artifacts").glob("*/.tmp-*"))


def test_after_every_failure_the_good_run_is_all_cache_hits(capsys, good):
    """Nothing a failed run left is trusted or missing: the good run again builds nothing."""
    assert main(["run", "--profile", good["profile"], "--home", str(good["home"]), "--only", "pack"]) == 0
    lin = Lineage(good["home"] / "lineage.duckdb")
    last = lin.runs(1)[0]
    stages = lin.stages(last["run_id"])
    assert [s["name"] for s in stages] == UP_TO_PACK and all(s["cache_hit"] for s in stages), stages
    for s in stages:
        verify(Path(lin.artifact(s["artifact_hash"])["path"]))
    assert _snapshot(good["home"]) == good["before"]
    failed = [r for r in lin.runs(100) if r["status"] == "failed"]
    assert len(failed) == good["failed_runs"], "every failed run is recorded as failed, none as completed"
    assert json.dumps(failed, default=str).count(FAKE_KEY) == 0
