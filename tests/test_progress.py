"""Progress bars (tinymars.progress) and the stages' Prefect progress artifacts (tasks.common.stage_progress).

Silent without a terminal or in CI, drawn with rate/ETA/postfix when forced, log lines printed above a bar
rather than through it, Prefect updates throttled (a fake clock counts them), every long stage of the
session's tiny run ending its progress artifact at 100%, and a real terminal (tmux) showing a bar.
"""

from __future__ import annotations

import io
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tinymars.progress import PROGRESS_ENV, Progress, ThrottledSink, bars_enabled, progress_setting_problem

ROOT = Path(__file__).resolve().parents[1]
TMUX = shutil.which("tmux") or "/usr/bin/tmux"
# tqdm's right part: "132/132 [00:00<00:00, 3116.93rows/s]" (count, elapsed<ETA, rate; a postfix after the rate)
BAR = re.compile(r"(\d+)/(\d+) \[\d\d:\d\d<(\d\d:\d\d|\?), (?:[\d.]+|\?)(\w+)/s")


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def no_setting(monkeypatch):
    monkeypatch.delenv(PROGRESS_ENV, raising=False)
    monkeypatch.delenv("CI", raising=False)


def test_bars_only_on_a_terminal_outside_ci_unless_forced(no_setting, monkeypatch):
    assert not bars_enabled(io.StringIO()) and bars_enabled(FakeTerminal())
    monkeypatch.setenv("CI", "true")
    assert not bars_enabled(FakeTerminal())
    monkeypatch.setenv(PROGRESS_ENV, "1")  # forced on: also in CI, also into a pipe
    assert bars_enabled(io.StringIO())
    monkeypatch.setenv(PROGRESS_ENV, "0")
    monkeypatch.delenv("CI")
    assert not bars_enabled(FakeTerminal())
    assert progress_setting_problem() is None
    monkeypatch.setenv(PROGRESS_ENV, "yes")
    assert "TINYMARS_PROGRESS='yes' is not a setting: use 1" in progress_setting_problem()


def test_silent_without_a_terminal(no_setting, monkeypatch):
    monkeypatch.setenv("CI", "1")
    for stream in (io.StringIO(), FakeTerminal()):  # a pipe; a terminal in CI
        with Progress("[pack] tokenising", 50, "rows", stream=stream) as progress:
            for done in range(0, 51, 10):
                progress(done, 50, loss=1.0)
        assert stream.getvalue() == ""


def test_forced_bar_shows_count_rate_eta_and_postfix(no_setting, monkeypatch):
    monkeypatch.setenv(PROGRESS_ENV, "1")
    stream = io.StringIO()
    with Progress("[corpus] teacher", None, "call", stream=stream) as progress:
        for done in range(1, 41):
            progress(done, 40, spent_usd=0.003 * done, max_usd=10.0)
            time.sleep(0.001)
    final = stream.getvalue().rstrip("\n").split("\r")[-1]
    match = BAR.search(final)
    assert final.startswith("[corpus] teacher: 100%") and match, final
    assert match.group(1, 2, 4) == ("40", "40", "call")  # count, total, rate unit
    assert final.endswith("$0.1200 of $10.00]"), final  # dollars against the budget


def test_training_postfix_and_a_new_round(no_setting, monkeypatch):
    monkeypatch.setenv(PROGRESS_ENV, "1")
    stream = io.StringIO()
    with Progress("[train:native] steps", 12, "step", stream=stream) as progress:
        progress(8, 12, loss=6.8834, tok_s=14146.0)
        progress(3, 5, phase="resample 1 calls")  # fewer than before: the bar starts over with the new total
        assert progress.bar.n == 3 and progress.bar.total == 5
    final = stream.getvalue().rstrip("\n").split("\r")[-1]
    assert "3/5 [" in final and final.endswith("phase resample 1 calls]"), final
    assert "loss 6.883 tok/s 14.1k" in stream.getvalue()


def test_log_lines_print_above_an_open_bar(no_setting, monkeypatch):
    """A console log line clears the bar first and the bar is redrawn after it, so no line holds both."""
    monkeypatch.setenv(PROGRESS_ENV, "1")
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    log = logging.getLogger(f"tinymars-test-{uuid.uuid4().hex}")
    handler = logging.StreamHandler(sys.stderr)
    log.addHandler(handler)
    log.propagate = False
    try:
        with Progress("[pack] tokenising", 10, "rows") as progress:
            progress(4, 10)
            progress.bar.refresh()
            assert "emit" in handler.__dict__  # routed through tqdm while the bar is open
            log.warning("a log line")
            progress(10, 10)
        assert "emit" not in handler.__dict__  # and restored once no bar is open
    finally:
        log.removeHandler(handler)
    before, after = stream.getvalue().split("a log line\n")
    assert before.endswith("\r"), repr(before[-80:])  # the bar was cleared: the line starts at column 0
    assert after.startswith("\r[pack] tokenising:  40%"), repr(after[:80])  # and redrawn below it


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_sink_hears_at_most_once_a_second_and_always_the_end():
    clock, writes = FakeClock(), []
    sink = ThrottledSink(lambda pct, text: writes.append((clock.now, pct, text)), interval_s=1.0, clock=clock)
    for step in range(1, 36):  # 35 updates 0.1 s apart: 3.5 s
        clock.now = 100.0 + step / 10
        sink(step * 2.0, f"{step}")
    sink.close()
    times = [t for t, _, _ in writes]
    # by hand: written at 1.0, 2.0 and 3.0 s after the start, and the held-back last state (3.5 s) on close
    assert [round(t - 100.0, 6) for t in times] == [1.0, 2.0, 3.0, 3.5]
    assert [text for _, _, text in writes] == ["10", "20", "30", "35"]

    clock.now, writes[:] = 0.0, []
    fast = ThrottledSink(lambda pct, text: writes.append(pct), clock=clock)
    for pct in (10.0, 50.0, 100.0):  # a stage faster than a second: one write, its end
        clock.now += 0.01
        fast(pct, "")
    fast.close()
    assert writes == [100.0]


def test_progress_feeds_its_sink_percent_and_summary(no_setting):
    clock, writes = FakeClock(), []
    with Progress("[generate] responses", None, "resp", sink=lambda p, d: writes.append((p, d)), clock=clock,
                  stream=io.StringIO()) as progress:
        for done in (8, 16, 24):
            clock.now += 0.6
            progress(done, 24, turn=0, arm="mars")
    assert writes == [(pytest.approx(100 * 16 / 24), "[generate] responses: 16/24 resp, turn 0 arm mars"),
                      (100.0, "[generate] responses: 24/24 resp, turn 0 arm mars")]


# ------------------------------------------------------------------ a real run
def _flow_run_id(home: Path) -> str:
    import duckdb

    con = duckdb.connect(str(home / "lineage.duckdb"), read_only=True)
    try:
        (run_id,) = con.execute("SELECT prefect_flow_run_id FROM runs").fetchone()
    finally:
        con.close()
    return run_id


def test_every_long_stage_of_a_run_ends_its_progress_artifact_at_100(tiny_reference):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        ArtifactFilterType,
        FlowRunFilter,
        TaskRunFilter,
    )

    flow_run = uuid.UUID(_flow_run_id(tiny_reference))
    with get_client(sync_client=True) as client:  # the sync client sends unset filters as null: set them all
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run]),
                                           type=ArtifactFilterType(any_=["progress"])),
            flow_run_filter=FlowRunFilter(), task_run_filter=TaskRunFilter(), limit=200, offset=0,
            sort="CREATED_DESC")
    found = {a.key: a for a in artifacts}
    expected = {"progress-channels-embedding", "progress-pack-tokenising", "progress-train-native-steps",
                "progress-train-baseline-steps", "progress-generate-responses"}
    assert expected <= set(found), sorted(found)
    for key in expected:
        assert found[key].data == 100 and found[key].task_run_id is not None, (key, found[key].data)
    # the training bar follows the trainer's streamed step lines: the last one, with its loss and tokens/s
    assert re.fullmatch(r"\[train:native\] steps: 12/12 step, loss \d+\.\d{3} tok/s \S+",
                        found["progress-train-native-steps"].description)


@pytest.mark.skipif(not Path(TMUX).exists(), reason="tmux is not installed")
def test_a_terminal_shows_the_pack_bar_between_intact_log_lines(tiny_reference, tmp_path):
    """`tinymars run` in a real pty (tmux), TINYMARS_PROGRESS and CI unset: the rebuilt pack stage draws its bar."""
    from prefect.settings import PREFECT_API_URL

    from tests.chaos_support import copy_home

    home = copy_home(tiny_reference, tmp_path / "home")
    tinymars = Path(sys.executable).parent / "tinymars"
    entry = [str(tinymars)] if tinymars.exists() else [sys.executable, "-m", "app.cli"]
    command = ["env", "-u", PROGRESS_ENV, "-u", "CI", f"PREFECT_API_URL={PREFECT_API_URL.value()}",  # the harness
               "PREFECT_LOGGING_LEVEL=INFO", "HF_HUB_OFFLINE=1", *entry, "run", "--profile", "tiny", "--only", "pack",
               "--refresh", "pack", "--home", str(home)]
    (tmp_path / "tmux.conf").write_text("set -g remain-on-exit on\n")
    tmux = [TMUX, "-L", f"tinymars-progress-{os.getpid()}", "-f", str(tmp_path / "tmux.conf")]
    # the shell prints the exit status: tmux 3.3a at times marks the pane dead (its pty closed) before it has
    # reaped the process, and then leaves #{pane_dead_status} empty
    shell = " ".join(shlex.quote(c) for c in command) + '; echo "run exited with $?"'
    subprocess.run([*tmux, "new-session", "-d", "-s", "run", "-x", "200", "-y", "50", "-c", str(ROOT),
                    shlex.join(["sh", "-c", shell])], check=True, timeout=30)
    try:
        deadline = time.monotonic() + 120
        while "run exited with" not in (screen := _screen(tmux)):
            assert time.monotonic() < deadline, screen
            time.sleep(0.2)
        assert "run exited with 0" in screen, screen
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True, timeout=10)
    lines = screen.splitlines()
    bars = [ln for ln in lines if ln.startswith("[pack] tokenising: 100%")]
    assert len(bars) == 1 and BAR.search(bars[0]).group(4) == "rows", screen
    logs = [ln for ln in lines if re.match(r"\d\d:\d\d:\d\d\.\d{3} \| ", ln)]
    assert any("[pack] done in" in ln for ln in logs), screen
    assert not any("%|" in ln for ln in logs), screen  # no log line carries a piece of a bar


def _screen(tmux: list[str]) -> str:
    return subprocess.run([*tmux, "capture-pane", "-t", "run", "-p", "-J", "-S", "-"], check=True,
                          capture_output=True, text=True, timeout=10).stdout
