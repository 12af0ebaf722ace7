"""`tinymars chat`'s session: a terminal REPL on models.engine, holding a channel state, steering and readouts.

Plain lines are prompts; lines starting with `/` change the state or show it (`/help` lists them).
A state is kept raw (what the user typed, in models.live_channels' request contract) and checked by
the engine when it is set, so an error names the channel field and nothing half-valid is kept.
`/compare` answers one prompt twice in one batch: with the current state and with every channel
zeroed (the eval's ABLATED arm: same model, same prompt, same steering and decoding).
"""

from __future__ import annotations

import re
import shlex
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TextIO

from models.engine import Engine, GenerationRequest, RequestError
from models.generate import GREEDY, Sampling
from models.live_channels import ChannelStateError
from tinymars.domain import CAPABILITIES, ETHICS_CATEGORIES, TEXT_CHANNELS

PROMPT = "you> "
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
OFF = ("off", "clear", "none")

HELP = """\
Plain lines are prompts. Commands:
  /affect V [S]        affect valence V in [-1, 1] (e.g. +0.8), saliency S in [0, 1] (default 0.5); or + / -
  /time HH[:MM] [DAY]  the hour (minutes are dropped: the channel reads whole hours), weekday mon..sun; or + / -
  /ethics C CATEGORY   caution C in [-1, 1] for a category (e.g. /ethics 0.7 medical)
  /memory TEXT         the salient memory (also /identity TEXT, /continuity TEXT); /CHANNEL off clears one
  /steer CONCEPT xM    add M x the concept's readout direction (e.g. /steer affect x1.0); /steer off
  /readout on|off      show the concept readouts of each answer (mean over its tokens)
  /ablate [on|off]     answer with every channel zeroed (the state is kept); no argument toggles
  /compare [PROMPT]    the same prompt (default: the last one) with the current state and ablated, side by side
  /max N               at most N new tokens per answer
  /state               show the channel state, steering and settings
  /help                this list
  /quit                leave (also /exit or Ctrl-D)"""


class CommandError(ValueError):
    """A command the session cannot apply; the message says what to type instead."""


@dataclass
class ChatState:
    """What the next answer is generated with."""

    channels: dict[str, Any] = field(default_factory=dict)  # raw values, checked by Engine.parse_channels
    steer: dict[str, float] = field(default_factory=dict)  # concept -> multiplier
    readouts: bool = False
    ablated: bool = False
    max_new_tokens: int = 48


def parse_channel_value(channel: str, args: list[str]) -> Any:
    """The words after `/CHANNEL` as a raw channel state (models.live_channels' request contract)."""
    if not args:
        raise CommandError(f"/{channel} needs a value; /help shows its form")
    if channel in TEXT_CHANNELS:
        return " ".join(args)
    if args[0] in ("+", "-"):
        return args[0]
    if channel == "affect":
        numbers = [_number(a, f"/affect: '{a}' is not a number; e.g. /affect +0.8 or /affect -0.5 0.9") for a in args]
        if len(numbers) > 2:
            raise CommandError("/affect takes a valence and an optional saliency, e.g. /affect +0.8 0.6")
        return {"valence": numbers[0], **({"saliency": numbers[1]} if len(numbers) == 2 else {})}
    if channel == "time":
        return _time_value(args)
    if channel == "ethics":
        if len(args) != 2:
            raise CommandError(f"/ethics takes a caution and a category, e.g. /ethics 0.7 medical; categories: "
                               f"{', '.join(ETHICS_CATEGORIES)}")
        return {"caution": _number(args[0], f"/ethics: caution '{args[0]}' is not a number in [-1, 1]"),
                "category": args[1]}
    raise CommandError(f"/{channel}: not a channel")


def _number(text: str, message: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise CommandError(message) from None


def _time_value(args: list[str]) -> dict[str, int]:
    match = re.fullmatch(r"(\d{1,2})(?::(\d{2}))?", args[0])
    if not match or int(match.group(1)) > 23 or (match.group(2) and int(match.group(2)) > 59):
        raise CommandError(f"/time: '{args[0]}' is not a time of day; e.g. /time 23:00 or /time 8")
    value = {"hour": int(match.group(1))}
    if len(args) > 1:
        day = args[1][:3].lower()
        if day not in WEEKDAYS or len(args) > 2:
            raise CommandError(f"/time: the weekday is one of {', '.join(WEEKDAYS)}, e.g. /time 23:00 sat")
        value["weekday"] = WEEKDAYS.index(day)
    return value


def parse_steer(args: list[str]) -> tuple[str, float]:
    """`CONCEPT xM` (or `CONCEPT M`) as (concept, multiplier)."""
    if len(args) == 1:
        return args[0], 1.0
    if len(args) != 2:
        raise CommandError("/steer takes a concept and a multiplier, e.g. /steer affect x1.0 (or /steer off)")
    text = args[1].lower().removeprefix("x")
    return args[0], _number(text, f"/steer: multiplier '{args[1]}' is not a number; e.g. x1.0 or x-0.5")


def describe_channel(channel: str, value: Any) -> str:
    """A raw channel value the way a person reads it back."""
    if channel == "time" and isinstance(value, dict):
        day = f" {WEEKDAYS[value['weekday']]}" if "weekday" in value else ""
        return f"{value['hour']:02d}:00{day}"
    if channel == "affect" and isinstance(value, dict):
        saliency = f" saliency {value['saliency']:.2f}" if "saliency" in value else ""
        return f"valence {value['valence']:+.2f}{saliency}"
    if channel == "ethics" and isinstance(value, dict):
        return f"caution {value['caution']:+.2f} ({value['category']})"
    if channel in TEXT_CHANNELS:
        return repr(value)
    return str(value)


class ChatSession:
    """One conversation with a loaded engine: `handle(line)` applies a command or answers a prompt."""

    def __init__(self, engine: Engine, out: TextIO | None = None, sampling: Sampling = GREEDY,
                 max_new_tokens: int = 48):
        self.engine = engine
        self.out = out or sys.stdout
        self.sampling = sampling
        self.state = ChatState(max_new_tokens=max_new_tokens)
        self.last_prompt: str | None = None
        self.commands: dict[str, Callable[[list[str], str], None]] = {
            "steer": self._steer, "readout": self._readout, "ablate": self._ablate, "compare": self._compare,
            "max": self._max, "state": lambda _a, _r: self.show_state(), "help": lambda _a, _r: self.say(HELP),
        }

    # ---- output -------------------------------------------------------------------------------------
    def say(self, text: str = "", end: str = "\n") -> None:
        self.out.write(text + end)
        self.out.flush()

    def banner(self) -> None:
        d = self.engine.describe()
        reads = ", ".join(f"{n} ({w}-d)" for n, w in d["channels"].items()) or "none (a channel-less model)"
        concepts = ", ".join(d["readout"]["concepts"]) if d["readout"] else "none (start with --readouts to steer)"
        self.say(f"tinymars chat: {d['name']} ({d['arch']}, {d['content_hash'] or 'outside a store'})")
        self.say(f"  channels: {reads}\n  readout concepts: {concepts}\n  /help lists the commands; /quit leaves")

    def state_line(self, with_ablation: bool = True) -> str:
        s = self.state
        parts = [f"{n} {describe_channel(n, v)}" for n, v in s.channels.items()] or ["no channel set"]
        if s.ablated and with_ablation:
            parts.append("ABLATED (channels zeroed)")
        parts += [f"steer {c} x{m:+.2f}" for c, m in s.steer.items()]
        return "state: " + "; ".join(parts)

    def show_state(self) -> None:
        self.say(self.state_line())
        self.say(f"  readouts {'on' if self.state.readouts else 'off'}; max {self.state.max_new_tokens} new tokens; "
                 f"{'greedy' if self.sampling.greedy else f'temperature {self.sampling.temperature}'}")

    # ---- commands -----------------------------------------------------------------------------------
    def handle(self, line: str) -> bool:
        """Apply one input line; False when the session should end."""
        line = line.strip()
        if not line:
            return True
        if not line.startswith("/"):
            self.answer(line)
            return True
        name, _, rest = line[1:].partition(" ")
        name = name.lower()
        if name in ("quit", "exit", "q"):
            return False
        try:
            args = shlex.split(rest) if name not in TEXT_CHANNELS else rest.split()
        except ValueError as exc:
            self.say(f"error: {exc}")
            return True
        try:
            if name in CAPABILITIES:
                self._channel(name, args)
            elif name in self.commands:
                self.commands[name](args, rest.strip())
            else:
                self.say(f"error: unknown command /{name}; /help lists the commands")
        except (CommandError, ChannelStateError, RequestError) as exc:
            self.say(f"error: {exc}")
        return True

    def _channel(self, name: str, args: list[str]) -> None:
        if len(args) == 1 and args[0].lower() in OFF:
            self.state.channels.pop(name, None)
        else:
            value = parse_channel_value(name, args)
            parsed = self.engine.parse_channels({name: value})  # checked now: the error names the field
            if name in TEXT_CHANNELS:  # embed now (the embedder loads once), not in the middle of an answer
                self.engine.channel_tensor([parsed])
            self.state.channels[name] = value
        self.say(self.state_line())

    def _steer(self, args: list[str], _rest: str) -> None:
        if len(args) == 1 and args[0].lower() in OFF:
            self.state.steer.clear()
        else:
            concept, multiplier = parse_steer(args)
            self.engine.parse_steer({"concept": concept, "multiplier": multiplier})
            self.state.steer[concept] = multiplier
        self.say(self.state_line())

    def _readout(self, args: list[str], _rest: str) -> None:
        if args not in (["on"], ["off"]):
            raise CommandError("/readout on or /readout off")
        if args == ["on"] and self.engine.readout is None:
            raise CommandError("this model was loaded without readouts; restart with --readouts STEER_ARTIFACT")
        self.state.readouts = args == ["on"]
        self.say(f"readouts {args[0]}")

    def _ablate(self, args: list[str], _rest: str) -> None:
        if args not in ([], ["on"], ["off"]):
            raise CommandError("/ablate, /ablate on or /ablate off")
        self.state.ablated = (not self.state.ablated) if not args else args == ["on"]
        self.say(self.state_line())

    def _max(self, args: list[str], _rest: str) -> None:
        if len(args) != 1 or not args[0].isdigit() or int(args[0]) < 1:
            raise CommandError("/max N with N >= 1 new tokens, e.g. /max 64")
        self.state.max_new_tokens = int(args[0])
        self.say(f"at most {self.state.max_new_tokens} new tokens per answer")

    # ---- generation ---------------------------------------------------------------------------------
    def _request(self, prompt: str, ablated: bool) -> GenerationRequest:
        s = self.state
        channels = None if ablated else self.engine.parse_channels(s.channels)
        steer = self.engine.parse_steer([{"concept": c, "multiplier": m} for c, m in s.steer.items()]) \
            if s.steer else ()
        return self.engine.request(prompt, channels=channels, max_new_tokens=s.max_new_tokens,
                                   sampling=self.sampling, steer=steer, readouts=s.readouts)

    def answer(self, prompt: str) -> None:
        """Stream one answer under the current state (ablated when /ablate is on)."""
        try:
            req = self._request(prompt, self.state.ablated)
        except (RequestError, ChannelStateError) as exc:
            self.say(f"error: {exc}")
            return
        self.last_prompt = prompt
        self.say("model> ", end="")
        tokens: list[int] = []
        shown = ""
        readouts: list[dict[str, float]] = []
        for event in self.engine.stream_batch([req]):
            if event.token_id is not None:
                tokens.append(event.token_id)
                text = self.engine.tokenizer.decode(tokens)
                if text.startswith(shown):  # print what the new token added (a piece can merge with the last)
                    self.say(text[len(shown):], end="")
                    shown = text
            if event.readout:
                readouts.append(event.readout)
        full = self.engine.tokenizer.decode(tokens)
        self.say(full[len(shown):] if full.startswith(shown) else f"\n{full}")
        if req.readouts:
            self.say("  " + readout_line(readouts))

    def _compare(self, _args: list[str], rest: str) -> None:
        prompt = rest or self.last_prompt
        if not prompt:
            raise CommandError("/compare PROMPT, or send a prompt first (it compares the last one)")
        reqs = [self._request(prompt, ablated=False), self._request(prompt, ablated=True)]
        current, ablated = self.engine.generate(reqs)
        self.last_prompt = prompt
        left = f"current: {self.state_line(with_ablation=False).removeprefix('state: ')}"
        columns = [(left, current.text, current.readouts), ("ablated: channels zeroed", ablated.text,
                                                            ablated.readouts)]
        self.say(f"compare: {prompt!r}")
        side_by_side(self.out, columns)

    # ---- the loop -----------------------------------------------------------------------------------
    def loop(self, read: Callable[[str], str] = input) -> None:
        """Read lines until /quit or end of input; Ctrl-C drops the current line."""
        while True:
            try:
                line = read(PROMPT)
            except EOFError:
                self.say()
                return
            except KeyboardInterrupt:
                self.say()
                continue
            if not self.handle(line):
                return


def readout_line(readouts: Iterable[dict[str, float]] | None) -> str:
    rows = list(readouts or [])
    if not rows:
        return "readout: (no tokens)"
    means = {c: sum(r[c] for r in rows) / len(rows) for c in rows[0]}
    return "readout: " + "  ".join(f"{c} {v:+.3f}" for c, v in means.items()) + f"  (mean of {len(rows)} tokens)"


def side_by_side(out: TextIO, columns: list[tuple[str, str, list[dict[str, float]] | None]]) -> None:
    """Two answers in two columns (rich when it is installed, plain blocks otherwise)."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        for title, text, readouts in columns:
            out.write(f"--- {title}\n{text}\n" + (f"{readout_line(readouts)}\n" if readouts is not None else ""))
        out.flush()
        return
    table = Table(show_lines=False, expand=True)
    for title, _, _ in columns:
        table.add_column(title, ratio=1, overflow="fold")
    table.add_row(*(text or "(empty)" for _, text, _ in columns))
    if any(readouts is not None for _, _, readouts in columns):
        table.add_row(*(readout_line(r) if r is not None else "" for _, _, r in columns))
    Console(file=out, soft_wrap=False).print(table)
    out.flush()
