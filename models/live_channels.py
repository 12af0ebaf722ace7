"""A live model's channel state: a request's raw state -> the corpus's state contract -> the [C, D] tensor.

A served model must read a state exactly as it read it in training, so the numeric channels go
through the same encoder (`corpus.encode.encode_numeric`) and the text channels through the same
embedder (named in the channels artifact the model was trained on) as the channels stage.

What a request may send per channel (any subset of the model's channels; a channel left out is
zeros, as a corpus row that does not set it):
- memory / identity / continuity: a text, or the corpus's `{"text": ..., "salient_item": ...}`;
- affect: `{"valence", "saliency"[, "dominance"]}`, a number (valence, saliency 0.5) or a pole
  `"+"` / `"-"` (valence +0.8 / -0.8: the middle of the corpus's pole magnitudes);
- time: `{"hour", "weekday"}`, an hour 0..23 (weekday 0), or a pole `"+"` (08:00) / `"-"` (23:00);
- ethics: `{"caution", "category"}` (the category is part of the state: no shorthand);
- any channel: a list of numbers, the already-encoded vector of that channel's width.

Every error is a `ChannelStateError` whose `field` names the offending field (`channels.affect.valence`).
"""

from __future__ import annotations

import math
import numbers
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from corpus.encode import encode_numeric
from tinymars.domain import ETHICS_CATEGORIES, TEXT_CHANNELS

POLE_VALENCE = 0.8  # the middle of the template teacher's pole magnitudes (0.6..0.95)
POLE_HOURS = {"+": 8, "-": 23}  # a morning hour and a night hour of the corpus's pole hours
STATE_KEYS = {"affect": {"valence", "saliency", "dominance"}, "time": {"hour", "weekday"},
              "ethics": {"caution", "category"}}
DEFAULTS = {"affect": {"saliency": 0.5}, "time": {"weekday": 0}}


class ChannelStateError(ValueError):
    """A request's channel state that cannot be read; `field` is the dotted name of the bad field."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class ChannelLayout:
    """Which channels a model reads, each one's own width, and the padded width D of the [C, D] tensor."""

    names: tuple[str, ...]
    dims: tuple[int, ...]
    width: int
    embedder: str | None

    def dim_of(self, name: str) -> int:
        return self.dims[self.names.index(name)]


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def parse_state(raw: Any, layout: ChannelLayout, field: str = "channels") -> dict[str, Any]:
    """The request's state in the corpus's contract ({channel: state}); raises ChannelStateError naming the field.

    A list value is kept as `{"vector": [...]}` (an encoded vector, checked for width and finiteness).
    """
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ChannelStateError(field, f"expected an object {{channel: state}}, got {type(raw).__name__}")
    out: dict[str, Any] = {}
    for name, value in raw.items():
        where = f"{field}.{name}"
        if name not in layout.names:
            reads = ", ".join(layout.names) if layout.names else "none (it is a channel-less model)"
            raise ChannelStateError(where, f"unknown channel; this model reads: {reads}")
        if isinstance(value, list):
            out[name] = {"vector": _vector(value, layout.dim_of(name), where)}
        elif name in TEXT_CHANNELS:
            out[name] = _text_state(value, where)
        else:
            out[name] = _numeric_state(name, value, layout.dim_of(name), where)
    return out


def _vector(value: list[Any], dim: int, where: str) -> list[float]:
    if len(value) != dim:
        raise ChannelStateError(where, f"a vector for this channel needs {dim} numbers, got {len(value)}")
    bad = [i for i, x in enumerate(value) if not _is_number(x) or not math.isfinite(x)]
    if bad:
        raise ChannelStateError(f"{where}[{bad[0]}]", f"must be a finite number, got {value[bad[0]]!r}")
    return [float(x) for x in value]


def _text_state(value: Any, where: str) -> dict[str, Any]:
    if isinstance(value, dict):
        unknown = sorted(set(value) - {"text", "salient_item"})
        if unknown:
            raise ChannelStateError(f"{where}.{unknown[0]}", "unknown field; a text channel takes text")
        value = value.get("text")
        where = f"{where}.text"
    if not isinstance(value, str) or not value.strip():
        raise ChannelStateError(where, f"expected a non-empty text, got {value!r}")
    return {"text": value}


def _numeric_state(name: str, value: Any, dim: int, where: str) -> dict[str, Any]:
    if isinstance(value, str) and value in ("+", "-"):
        if name == "affect":
            value = {"valence": POLE_VALENCE if value == "+" else -POLE_VALENCE}
        elif name == "time":
            value = {"hour": POLE_HOURS[value]}
    elif _is_number(value) and name in ("affect", "time"):
        value = {"valence": value} if name == "affect" else {"hour": value}
    if not isinstance(value, dict):
        shapes = {"affect": '{"valence", "saliency"}, a number or "+"/"-"',
                  "time": '{"hour", "weekday"}, an hour or "+"/"-"',
                  "ethics": '{"caution": -1..1, "category": one of tinymars.domain.ETHICS_CATEGORIES}'}
        raise ChannelStateError(where, f"expected {shapes[name]} or a list of {dim} numbers, got {value!r}")
    unknown = sorted(set(value) - STATE_KEYS[name])
    if unknown:
        raise ChannelStateError(f"{where}.{unknown[0]}", f"unknown field; allowed: {sorted(STATE_KEYS[name])}")
    state = {**DEFAULTS.get(name, {}), **value}
    missing = sorted(STATE_KEYS[name] - {"dominance"} - set(state))
    if missing:
        raise ChannelStateError(f"{where}.{missing[0]}", "missing")
    if name == "ethics" and state["category"] not in ETHICS_CATEGORIES:
        raise ChannelStateError(f"{where}.category", f"{state['category']!r} is not one of {list(ETHICS_CATEGORIES)}")
    try:
        encode_numeric(name, state, dim)  # the training encoder's own checks (ranges, NaN, integer hours)
    except (ValueError, TypeError) as exc:
        text = str(exc)  # e.g. "affect.valence must be in [-1, 1], got nan": name the sub-field
        sub = text.split(" ", 1)[0]
        raise ChannelStateError(f"{where}.{sub.split('.', 1)[1]}" if sub.startswith(f"{name}.") else where,
                                text) from None
    return state


class ChannelEncoder:
    """Parsed states -> the model's [N, C, D] channel tensor; texts embedded by the model's own embedder.

    The embedder loads on first use (a numeric-only state never loads it); embeddings are cached per text.
    """

    def __init__(self, layout: ChannelLayout, embed: Callable[[list[str]], np.ndarray] | None = None):
        self.layout = layout
        self._embed = embed
        self._cache: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()  # the server's batch worker and the online trainer both encode states

    def _embedder(self) -> Callable[[list[str]], np.ndarray]:
        if self._embed is None:
            if self.layout.embedder is None:
                raise ChannelStateError("channels", "this model's text channels have no embedder recorded")
            from corpus.embed import embed_texts, load_embedder

            model = load_embedder(self.layout.embedder)
            self._embed = lambda texts: embed_texts(model, texts)
        return self._embed

    def tensor(self, states: Sequence[dict[str, Any] | None]) -> torch.Tensor:
        """[N, C, D] float32; None or {} is the all-zero (ablated) state."""
        with self._lock:
            return self._tensor(states)

    def _tensor(self, states: Sequence[dict[str, Any] | None]) -> torch.Tensor:
        names, width = self.layout.names, self.layout.width
        out = torch.zeros(len(states), len(names), width)
        texts = sorted({s["text"] for st in states if st for n, s in st.items()
                        if n in TEXT_CHANNELS and "text" in s} - set(self._cache))
        if texts:
            vecs = self._embedder()(texts)
            for text, vec in zip(texts, vecs, strict=True):
                self._cache[text] = vec
        for r, state in enumerate(states):
            for name, s in (state or {}).items():
                c, dim = names.index(name), self.layout.dim_of(name)
                if "vector" in s:
                    vec = np.asarray(s["vector"], dtype=np.float32)
                elif name in TEXT_CHANNELS:
                    vec = self._cache[s["text"]]
                    if vec.shape[0] != dim:
                        raise ChannelStateError(f"channels.{name}", f"the embedder gives {vec.shape[0]}-d vectors "
                                                f"but the model reads {dim}")
                else:
                    vec = np.asarray(encode_numeric(name, s, dim), dtype=np.float32)
                out[r, c, :dim] = torch.from_numpy(np.ascontiguousarray(vec, dtype=np.float32))
        return out
