"""Progress of the long stages: a terminal bar (tqdm) with rate, ETA and a postfix, plus optional sinks.

Domain code (corpus/, models/) never sees a bar: it takes an optional plain callback
`progress(done, total, **info)` (`ProgressCallback`). The tasks layer (tasks.common.stage_progress)
builds a `Progress` that draws the bar and feeds a throttled sink (a Prefect progress artifact there;
this module imports no Prefect).

Bars go to stderr, and only when someone is watching: stderr is a terminal and `CI` is not set.
`TINYMARS_PROGRESS=1` forces them on (also into a pipe), `0` off. Without a bar nothing is printed:
the stages' log lines stay exactly as they are, so CI logs stay readable. While a bar is open, the
console log handlers print through `tqdm.external_write_mode`: the bar is cleared, the log line
printed, the bar redrawn below it, so Prefect's log output is never cut by a half-drawn bar.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol, TextIO

PROGRESS_ENV = "TINYMARS_PROGRESS"
ARTIFACT_INTERVAL_S = 1.0  # a sink (the Prefect API) hears at most about once a second


class ProgressCallback(Protocol):
    """What domain code calls: `progress(done, total, **info)`; info becomes the bar's postfix."""

    def __call__(self, done: int, total: int | None = None, **info: Any) -> None: ...


def progress_setting_problem() -> str | None:
    """Why $TINYMARS_PROGRESS is unusable (checked before a run starts), or None."""
    value = os.environ.get(PROGRESS_ENV)
    if value is None or value.strip() in ("", "0", "1"):
        return None
    return (f"{PROGRESS_ENV}={value!r} is not a setting: use 1 (progress bars on), 0 (off), or leave it unset "
            "(bars when stderr is a terminal and CI is not set)")


def bars_enabled(stream: TextIO | None = None) -> bool:
    """Whether to draw bars on `stream` (default stderr): forced by $TINYMARS_PROGRESS, else a TTY outside CI."""
    forced = os.environ.get(PROGRESS_ENV, "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
        return False
    stream = stream if stream is not None else sys.stderr
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def describe(info: dict[str, Any]) -> str:
    """The postfix of a bar from a callback's info: dollars against the budget, loss and tokens/s first."""
    parts = []
    rest = dict(info)
    spent, budget = rest.pop("spent_usd", None), rest.pop("max_usd", None)
    if spent is not None:
        parts.append(f"${spent:,.4f}" + (f" of ${budget:,.2f}" if budget is not None else " spent"))
    if (loss := rest.pop("loss", None)) is not None:
        parts.append(f"loss {loss:.3f}")
    if (tok_s := rest.pop("tok_s", None)) is not None:
        parts.append(f"tok/s {_compact(tok_s)}")
    for key, value in rest.items():
        if value is not None:
            parts.append(f"{key} {_compact(value) if isinstance(value, int | float) else value}")
    return " ".join(parts)


def _compact(value: float) -> str:
    """14146 -> '14.1k', 0.5 -> '0.5': a postfix has no room for digits nobody reads."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.1f}{suffix}"
    return f"{value:g}" if isinstance(value, float) else str(value)


class ThrottledSink:
    """Hands `write(percent, description)` the latest state at most once per `interval_s` (the first time
    `interval_s` after it starts, so a stage faster than that makes one write), and always the last state
    on `close` when it was held back. A completed state (100%) is written at once."""

    def __init__(self, write: Callable[[float, str], None], interval_s: float = ARTIFACT_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic):
        self.write, self.interval_s, self.clock = write, interval_s, clock
        self.last_write = clock()
        self.held: tuple[float, str] | None = None
        self.written: tuple[float, str] | None = None

    def __call__(self, percent: float, description: str) -> None:
        now = self.clock()
        if percent >= 100.0 or now - self.last_write >= self.interval_s:
            self._write((percent, description), now)
        else:
            self.held = (percent, description)

    def close(self) -> None:
        if self.held is not None:
            self._write(self.held, self.clock())

    def _write(self, state: tuple[float, str], now: float) -> None:
        self.held = None
        if state == self.written:
            return
        self.written, self.last_write = state, now
        self.write(*state)


class Progress:
    """A `ProgressCallback` that draws a bar (when bars are enabled) and feeds an optional throttled sink.

    Use it as a context manager: leaving closes the bar (it stays on screen, as a record of the stage)
    and flushes the sink's last state.
    """

    def __init__(self, label: str, total: int | None, unit: str = "it", *,
                 sink: Callable[[float, str], None] | None = None, stream: TextIO | None = None,
                 enabled: bool | None = None, clock: Callable[[], float] = time.monotonic):
        self.label, self.total, self.unit = label, total, unit
        self.done = 0
        self.postfix = ""
        self.sink = ThrottledSink(sink, clock=clock) if sink is not None else None
        stream = stream if stream is not None else sys.stderr
        self.bar = _open_bar(label, total, unit, stream) if (bars_enabled(stream) if enabled is None else enabled) \
            else None

    def __call__(self, done: int, total: int | None = None, **info: Any) -> None:
        if total is not None and total != self.total:
            self.total = total
            if self.bar is not None:
                self.bar.total = total
        if done < self.done and self.bar is not None:  # a new round (a teacher's resample): start the bar over
            self.bar.reset(total=self.total)
        self.done = done
        if info:
            self.postfix = describe(info)
        if self.bar is not None:
            if info:
                self.bar.set_postfix_str(self.postfix, refresh=False)
            self.bar.update(done - self.bar.n)
        if self.sink is not None and self.total:
            self.sink(min(100.0, 100.0 * done / self.total), self.summary())

    def summary(self) -> str:
        """One line for the sink: `[pack] tokenising: 120/500 rows, <postfix>`."""
        counted = f"{self.done:,}/{self.total:,}" if self.total else f"{self.done:,}"
        line = f"{self.label}: {counted} {self.unit}"
        return f"{line}, {self.postfix}" if self.postfix else line

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
            _LOGS_ABOVE_BARS.release()
        if self.sink is not None:
            self.sink.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _open_bar(label: str, total: int | None, unit: str, stream: TextIO):
    from tqdm import tqdm

    _LOGS_ABOVE_BARS.acquire()
    big = total is not None and total >= 100_000  # 1.2M tok, but 0/480 rows rather than 0.00/480
    return tqdm(total=total, desc=label, unit=unit, unit_scale=big, file=stream, dynamic_ncols=True,
                mininterval=0.2, smoothing=0.1, leave=True)


class _LogsAboveBars:
    """While any bar is open, console log handlers (stream handlers on stdout/stderr, Prefect's included)
    write through tqdm.external_write_mode: clear the bars, print the line, redraw them."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.open = 0
        self.wrapped: list[tuple[logging.Handler, Any]] = []

    def acquire(self) -> None:
        with self.lock:
            self.open += 1
            if self.open == 1:
                for handler in _console_handlers():
                    self.wrapped.append((handler, handler.__dict__.get("emit")))
                    handler.emit = _through_tqdm(handler.emit, handler.stream)  # type: ignore[method-assign]

    def release(self) -> None:
        with self.lock:
            self.open -= 1
            if self.open == 0:
                for handler, before in self.wrapped:
                    if before is None:
                        handler.__dict__.pop("emit", None)
                    else:
                        handler.emit = before  # type: ignore[method-assign]
                self.wrapped.clear()


_LOGS_ABOVE_BARS = _LogsAboveBars()


def _console_handlers() -> list[logging.StreamHandler]:
    loggers = [logging.getLogger(), *(lg for lg in logging.Logger.manager.loggerDict.values()
                                      if isinstance(lg, logging.Logger))]
    seen: dict[int, logging.StreamHandler] = {}
    for lg in loggers:
        for handler in lg.handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler) \
                    and getattr(handler, "stream", None) in (sys.stderr, sys.stdout, sys.__stderr__, sys.__stdout__):
                seen[id(handler)] = handler
    return list(seen.values())


def _through_tqdm(emit: Callable[[logging.LogRecord], None], stream: TextIO) -> Callable[[logging.LogRecord], None]:
    from tqdm import tqdm

    def emit_above_bars(record: logging.LogRecord) -> None:
        with tqdm.external_write_mode(file=stream):
            emit(record)

    return emit_above_bars
