"""Channel state -> what the model reads: numeric vectors, the text to embed, or the state written as text.

Numeric layouts (the contract in ARCHITECTURE.md, zero padded up to the requested dim):
- affect: [valence, saliency] (+ dominance at index 2 when dim >= 3, the PAD variant).
- time: [sin hour, cos hour, sin weekday, cos weekday, night, morning, afternoon, evening]; the cyclic
  pairs keep 23:00 next to 00:00 and Sunday next to Monday, the one-hot phase gives the coarse
  circadian state directly.
- ethics: one slot per category in ETHICS_CATEGORIES order; the state's category gets `caution`,
  every other category `caution * 0.5`. The posture's sign is thus readable from any slot (a model
  that ignores categories still sees cautious vs permissive), and the category is the one slot at
  double magnitude.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

from tinymars.domain import ETHICS_CATEGORIES, MIN_DIMS, TEXT_CHANNELS

PHASES = ("night", "morning", "afternoon", "evening")
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")


def phase_of(hour: int) -> str:
    """Circadian phase: night 21-4, morning 5-11, afternoon 12-16, evening 17-20."""
    if hour >= 21 or hour < 5:
        return "night"
    if hour < 12:
        return "morning"
    return "afternoon" if hour < 17 else "evening"


def _unit(name: str, value: Any, low: float, high: float) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in [{low}, {high}], got {value!r}") from None
    if not low <= x <= high:  # NaN fails this too
        raise ValueError(f"{name} must be in [{low}, {high}], got {value!r}")
    return x


def _int_in(name: str, value: Any, high: int) -> int:
    whole = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value) \
        and int(value) == value
    if not whole or not 0 <= int(value) <= high:
        raise ValueError(f"{name} must be an integer in 0..{high}, got {value!r}")
    return int(value)


def _affect(state: dict[str, Any], dim: int) -> list[float]:
    vec = [_unit("affect.valence", state["valence"], -1, 1)]
    vec.append(_unit("affect.saliency", state["saliency"], 0, 1))
    if dim >= 3:
        vec.append(_unit("affect.dominance", state.get("dominance", 0.0), -1, 1))
    return vec


def _time(state: dict[str, Any]) -> list[float]:
    hour = _int_in("time.hour", state["hour"], 23)
    day = _int_in("time.weekday", state["weekday"], 6)
    h, d = 2 * math.pi * hour / 24, 2 * math.pi * day / 7
    phase = phase_of(hour)
    return [math.sin(h), math.cos(h), math.sin(d), math.cos(d), *(float(p == phase) for p in PHASES)]


def _ethics(state: dict[str, Any]) -> list[float]:
    caution = _unit("ethics.caution", state["caution"], -1, 1)
    category = state["category"]
    if category not in ETHICS_CATEGORIES:
        raise ValueError(f"ethics.category {category!r} is not one of tinymars.domain.ETHICS_CATEGORIES")
    return [caution if c == category else caution * 0.5 for c in ETHICS_CATEGORIES]


def encode_numeric(capability: str, state: dict[str, Any], dim: int) -> list[float]:
    """The `dim`-long vector for a numeric channel state; ValueError when `dim` is below the layout's size."""
    if capability not in MIN_DIMS:
        raise ValueError(f"{capability!r} is not a numeric channel; numeric channels: {tuple(MIN_DIMS)}")
    if dim < MIN_DIMS[capability]:
        raise ValueError(f"channel {capability!r} needs dim >= {MIN_DIMS[capability]}, got {dim}")
    if capability == "affect":
        vec = _affect(state, dim)
    elif capability == "time":
        vec = _time(state)
    else:
        vec = _ethics(state)
    return vec + [0.0] * (dim - len(vec))


def state_text(capability: str, state: dict[str, Any]) -> str:
    """The text a text channel embeds: the salient item itself (state, never instructions)."""
    if capability not in TEXT_CHANNELS:
        raise ValueError(f"{capability!r} is not a text channel; text channels: {TEXT_CHANNELS}")
    return str(state["text"])


def state_as_prompt_text(capability: str, state: dict[str, Any]) -> str:
    """The same state as plain prompt text, for the channel-vs-text arm (e.g. "[state: mood warm, ...]")."""
    if capability == "memory":
        return f"[state: salient memory: {state['text']}]"
    if capability == "identity":
        return f"[state: speaking as: {state['text']}]"
    if capability == "continuity":
        return f"[state: active thread: {state['text']}]"
    if capability == "affect":
        v = float(state["valence"])
        mood = "warm" if v > 0 else "cold" if v < 0 else "neutral"
        return f"[state: mood {mood}, valence {v:+.2f}, saliency {float(state['saliency']):.2f}]"
    if capability == "time":
        hour, day = int(state["hour"]), int(state["weekday"])
        return f"[state: time {hour:02d}:00 {WEEKDAYS[day]} {phase_of(hour)}]"
    if capability == "ethics":
        c = float(state["caution"])
        posture = "cautious" if c > 0 else "permissive" if c < 0 else "neutral"
        return f"[state: posture {posture}, caution {c:+.2f}, category {state['category']}]"
    raise ValueError(f"unknown capability {capability!r}")
