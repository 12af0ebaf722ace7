"""`tinymars chat`: the REPL in a real terminal (tmux), and its commands checked against the engine itself.

Both use the session's tiny run (a copy of its home): the native model, and the steer artifact lineage
records as built from it (found by --readouts auto).
"""

from __future__ import annotations

import io
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.chaos_support import copy_home

ROOT = Path(__file__).resolve().parents[1]
TMUX = shutil.which("tmux") or "/usr/bin/tmux"


@pytest.fixture(scope="module")
def chat_home(tiny_reference, tmp_path_factory) -> Path:
    return copy_home(tiny_reference, tmp_path_factory.mktemp("chat") / "home")


def _model_and_steer(home: Path) -> tuple[Path, Path]:
    import duckdb

    con = duckdb.connect(str(home / "lineage.duckdb"), read_only=True)
    try:
        rows = dict(con.execute("SELECT name, path FROM artifacts WHERE name IN ('train:native', 'steer')").fetchall())
    finally:
        con.close()
    return Path(rows["train:native"]), Path(rows["steer"])


# ------------------------------------------------------------------ a real terminal
class Tmux:
    """A private tmux server (its own socket) running one command in a detached session."""

    def __init__(self, name: str, command: list[str], config: Path):
        config.write_text("set -g remain-on-exit on\n")  # a pane that exits stays readable, with its status
        self.base = [TMUX, "-L", name, "-f", str(config)]
        subprocess.run([*self.base, "new-session", "-d", "-s", "chat", "-x", "160", "-y", "60", "-c", str(ROOT),
                        " ".join(shlex.quote(c) for c in command)], check=True, timeout=30)

    def send(self, line: str) -> None:
        subprocess.run([*self.base, "send-keys", "-t", "chat", "-l", line], check=True, timeout=10)
        subprocess.run([*self.base, "send-keys", "-t", "chat", "Enter"], check=True, timeout=10)

    def screen(self) -> str:
        return subprocess.run([*self.base, "capture-pane", "-t", "chat", "-p", "-J", "-S", "-"], check=True,
                              capture_output=True, text=True, timeout=10).stdout

    def pane(self, fmt: str) -> str:
        return subprocess.run([*self.base, "display-message", "-t", "chat", "-p", fmt], check=True,
                              capture_output=True, text=True, timeout=10).stdout.strip()

    def wait_for(self, done, timeout: float = 180.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            text = self.screen()
            if done(text):
                return text
            if self.pane("#{pane_dead}") == "1":
                raise AssertionError(f"tinymars chat exited ({self.pane('#{pane_dead_status}')}); it shows:\n{text}")
            if time.monotonic() > deadline:
                raise AssertionError(f"the terminal never reached the expected state; it shows:\n{text}")
            time.sleep(0.2)

    def kill(self) -> None:
        subprocess.run([*self.base, "kill-server"], capture_output=True, timeout=10)


def _prompts(text: str) -> int:
    return sum(line.startswith("you> ") or line == "you>" for line in text.splitlines())


@pytest.mark.skipif(not Path(TMUX).exists(), reason="tmux is not installed")
def test_chat_in_a_terminal(chat_home, tmp_path):
    model, _ = _model_and_steer(chat_home)
    tinymars = Path(sys.executable).parent / "tinymars"
    entry = [str(tinymars)] if tinymars.exists() else [sys.executable, "-m", "app.cli"]
    chat = ["env", "HF_HUB_OFFLINE=1", "TOKENIZERS_PARALLELISM=false", *entry,
            "chat", str(model), "--home", str(chat_home), "--max-tokens", "12"]
    # the shell prints the exit status: tmux 3.3a leaves #{pane_dead_status} empty for this process
    command = ["sh", "-c", " ".join(shlex.quote(c) for c in chat) + '; echo "chat exited with $?"']
    term = Tmux(f"tinymars-chat-test-{os.getpid()}", command, tmp_path / "tmux.conf")
    try:
        term.wait_for(lambda t: _prompts(t) >= 1)  # banner, then the first prompt
        prompt = "How was your week?"
        steps = [prompt, "/affect +0.8", prompt, "/compare"]
        for n, line in enumerate(steps, start=2):
            term.send(line)
            screen = term.wait_for(lambda t, n=n: _prompts(t) >= n)
        lines = screen.splitlines()
        assert "channels: memory (384-d), identity (384-d)" in screen  # the banner names the model's channels
        answers = [ln for ln in lines if ln.startswith("model> ")]
        assert len(answers) == 2 and all(ln.split("model> ", 1)[1].strip() for ln in answers)
        assert "state: affect valence +0.80" in lines  # the state change shows
        # /compare: one table, two columns (current state vs ablated), an answer in each
        assert "compare: 'How was your week?'" in screen
        header = next(ln for ln in lines if "current: affect valence +0.80" in ln)
        assert "ablated: channels zeroed" in header
        body = lines[next(i for i, ln in enumerate(lines) if ln.startswith("┡")) + 1]
        cells = [c.strip() for c in body.strip("│ ").split("│")]
        assert len(cells) == 2 and all(cells), body
        term.send("/quit")
        screen = term.wait_for(lambda t: "chat exited with" in t, timeout=30)
        assert "chat exited with 0" in screen  # /quit ends the process cleanly
    finally:
        term.kill()


# ------------------------------------------------------------------ the commands against the engine
@pytest.fixture(scope="module")
def session(chat_home, minilm):
    from app.chat import ChatSession
    from app.commands.chat import lineage_readouts
    from corpus.embed import embed_texts
    from models.engine import Engine

    model, steer = _model_and_steer(chat_home)
    assert lineage_readouts(str(chat_home), model) == steer  # --readouts auto finds the model's steer artifact
    engine = Engine.load(model, readouts=steer, embed=lambda texts: embed_texts(minilm, texts))
    return ChatSession(engine, out=io.StringIO(), max_new_tokens=8)


def _run(session, *lines: str) -> str:
    session.out.seek(0)
    session.out.truncate()
    for line in lines:
        assert session.handle(line)
    return session.out.getvalue()


def test_channel_commands_set_the_state_the_engine_reads(session, minilm):
    from corpus.embed import embed_texts
    from corpus.encode import encode_numeric

    out = _run(session, "/affect +0.8", "/time 23:00 sat", "/ethics 0.7 medical", "/memory spent a week in Lisbon")
    assert "state: affect valence +0.80; time 23:00 sat; ethics caution +0.70 (medical); memory" in out
    engine = session.engine
    tensor = engine.channel_tensor([engine.parse_channels(session.state.channels)])[0]
    names, dims = engine.source.layout.names, engine.source.layout.dims
    expected = {  # the training encoders, called directly
        "affect": encode_numeric("affect", {"valence": 0.8, "saliency": 0.5}, dims[names.index("affect")]),
        "time": encode_numeric("time", {"hour": 23, "weekday": 5}, dims[names.index("time")]),
        "ethics": encode_numeric("ethics", {"caution": 0.7, "category": "medical"}, dims[names.index("ethics")]),
        "memory": embed_texts(minilm, ["spent a week in Lisbon"])[0],
    }
    for name, vector in expected.items():
        c = names.index(name)
        assert tensor[c, : dims[c]].numpy() == pytest.approx(list(vector), abs=1e-6), name
    assert not tensor[names.index("identity")].any()  # a channel not set is zeros

    out = _run(session, "/time off", "/memory off")
    assert "time" not in session.state.channels and "memory" not in session.state.channels
    assert out.splitlines()[-1] == "state: affect valence +0.80; ethics caution +0.70 (medical)"


def _table_columns(out: str) -> tuple[str, str]:
    """The two body columns of a /compare table, whitespace removed (rich wraps cells at any width)."""
    lines = out.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("┡"))
    cells = [ln.strip("│").split("│") for ln in lines[start + 1:] if ln.startswith("│")]
    return tuple("".join("".join(row[i].split()) for row in cells) for i in (0, 1))  # type: ignore[return-value]


def test_compare_is_the_engine_with_and_without_channels(session):
    from models.engine import SteerSpec

    _run(session, "/affect -0.9", "/steer affect x0.5", "/readout on")
    out = _run(session, "/compare Tell me about tomorrow.")
    engine = session.engine
    state = engine.parse_channels(session.state.channels)
    steer = (SteerSpec("affect", 0.5),)
    with_state, ablated = engine.generate([
        engine.request("Tell me about tomorrow.", channels=state, max_new_tokens=8, steer=steer, readouts=True),
        engine.request("Tell me about tomorrow.", channels=None, max_new_tokens=8, steer=steer, readouts=True)])
    assert "current: affect valence -0.90" in out and "ablated: channels zeroed" in out
    left, right = _table_columns(out)
    assert "".join(with_state.text.split()) in left and "".join(ablated.text.split()) in right
    assert left.count("readout:affect") == right.count("readout:affect") == 1

    answer = _run(session, "/ablate on", "Tell me about tomorrow.")
    assert "ABLATED" in answer and answer.split("model> ", 1)[1].splitlines()[0] == ablated.text
    answer = _run(session, "/ablate off", "Tell me about tomorrow.")
    assert answer.split("model> ", 1)[1].splitlines()[0] == with_state.text
    _run(session, "/steer off", "/readout off")


@pytest.mark.parametrize("line, message", [
    ("/affect 3", "channels.affect.valence"),
    ("/affect warm", "/affect: 'warm' is not a number"),
    ("/time 25:00", "/time: '25:00' is not a time of day"),
    ("/ethics 0.5 nope", "channels.ethics.category"),
    ("/steer nope x1", "steer.concept: 'nope' is not in the readout"),
    ("/steer affect xfast", "multiplier 'xfast' is not a number"),
    ("/readout maybe", "/readout on or /readout off"),
    ("/max 0", "/max N with N >= 1"),
    ("/frobnicate", "unknown command /frobnicate"),
])
def test_bad_commands_name_the_field_and_keep_the_state(session, line, message):
    before = (dict(session.state.channels), dict(session.state.steer))
    out = _run(session, line)
    assert out.startswith("error: ") and message in out
    assert (session.state.channels, session.state.steer) == before


def test_quit_ends_the_session(session):
    assert session.handle("/quit") is False
    assert session.handle("/state") is True
