"""Simulated eval generations with a known truth, to calibrate the verdict layer (bench/calibration.py).

Takes held-out corpus rows (the row contract of `corpus.rows`) and returns generation records in the
schema `scorers.evaluate` reads, so the real scorers and the real hypothesis layer judge them: a response
is a short text built from the scorers' own vocabularies (an item's key terms, a register lexicon's
single words), never a score handed over directly. What a response says is drawn from a latent model:

- Prompt-level random effects, drawn once per prompt (a prompt's character, shared by its rows and arms):
  how readily it makes a response single out one item (`item_propensity`), which of its items it
  prefers (`item_preference`, Dirichlet), how often a register response is toned (`tone_propensity`),
  which way the tone leans (`tone_lean`), how often a conflict response goes against the pole its prompt
  text asserts (`against_text`, mean 1/2, so a conflict row follows the channel at exactly chance on
  average: a model that reassures the anxious and cautions the careless on some prompts and agrees on
  others, whatever the channel says). Each arm then draws its own copy around the prompt's
  (Beta with mean the prompt's value, concentration `arm_concentration`): the arm's decoding nudges the
  whole prompt, so an arm's rows of one prompt move together and a test that counts rows as independent
  units is overconfident.
- An arm (`ArmModel`) answers `tied` (greedy with channels zeroed: rows whose inputs are identical get
  one response, so a selection prompt's three rows share one text and a register prompt's + and -
  responses are the same) or sampled (every row its own draw from the arm's prompt distribution).
  Without a planted effect no response knows the row's channel state, so every arm is a null arm.
- A planted effect `follow[capability]`: with that probability a response carries the row's state (names
  the salient item twice; takes the channel's pole), otherwise it is the arm's null draw.

Tied arms only tie where a real greedy arm would: conflict rows differ in their prompt text, so they
are always sampled. Only turn-0 records are made. Plain Python (`random.Random`, seeded by the caller):
no Prefect, no torch.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from scorers.evaluate import KINDS
from scorers.register import lexicons, register_hits
from scorers.text import words
from tinymars.domain import CONCEPTS, REGISTER_CAPABILITIES

STEER_CAPABILITIES = CONCEPTS  # the steer arm answers only the rows of the directional concepts


@dataclass(frozen=True)
class PromptModel:
    """The population prompts are drawn from: Beta (a, b) / Dirichlet parameters of the random effects."""

    item_propensity: tuple[float, float] = (2.0, 2.0)
    item_preference: float = 1.0
    tone_propensity: tuple[float, float] = (3.0, 2.0)
    tone_lean: tuple[float, float] = (2.0, 2.0)
    against_text: tuple[float, float] = (1.0, 1.0)
    arm_concentration: float = 4.0

    def __post_init__(self) -> None:
        for name in ("item_propensity", "tone_propensity", "tone_lean", "against_text"):
            a, b = getattr(self, name)
            if not (a > 0 and b > 0):
                raise ValueError(f"PromptModel.{name} needs two positive Beta parameters, got {(a, b)}")
        if not self.item_preference > 0 or not self.arm_concentration > 0:
            raise ValueError("PromptModel.item_preference and arm_concentration must be positive")


@dataclass(frozen=True)
class ArmModel:
    """How one arm answers: tied (greedy, channels zeroed) or sampled, and the planted effect per capability."""

    tied: bool = False
    follow: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        bad = {cap: p for cap, p in self.follow.items() if not 0.0 <= p <= 1.0}
        if bad:
            raise ValueError(f"ArmModel.follow is a probability per capability; out of [0, 1]: {bad}")
        if self.tied and any(self.follow.values()):
            raise ValueError("ArmModel: a tied arm (greedy, channels zeroed) cannot carry a planted effect; "
                             "set tied=False or follow={}")


# ---------------------------------------------------------------- texts the scorers read
_SELECTION_NAMED = ("I would start with the {key}.", "The {key} is the one to pick here.",
                    "Go for the {key}, really.")
_SELECTION_RUNNER_UP = "Maybe the {key} later."
_SELECTION_GENERIC = ("It depends on your plans this week.", "Pick whichever suits your mood today.")
_SELECTION_LIST = "You could try the {a}, the {b} or the {c}."
_REGISTER_FRAME = ("Here is my answer", "Right, here is the plan", "So, about your question")
_NEUTRAL = (*_SELECTION_NAMED, _SELECTION_RUNNER_UP, *_SELECTION_GENERIC, _SELECTION_LIST, *_REGISTER_FRAME)


@cache
def tone_words(capability: str, pole: str) -> tuple[str, ...]:
    """The lexicon's single-word entries of one pole (phrases and negators left out, so one word is one hit)."""
    negators = set(lexicons()["negators"])
    return tuple(w for w in lexicons()[capability][pole] if len(words(w)) == 1 and w not in negators)


def _check_neutral_frames() -> None:
    """The frames must score 0 on every lexicon, or a 'neutral' response would carry a tone."""
    for capability in REGISTER_CAPABILITIES:
        for frame in _NEUTRAL:
            if register_hits(frame.format(key="x", a="x", b="x", c="x"), capability) != (0, 0):
                raise RuntimeError(f"simulator frame {frame!r} hits the {capability} lexicon; reword it")


_check_neutral_frames()


def _key(item: dict[str, Any], rng: random.Random) -> str:
    return str(rng.choice(item["keys"]))


def selection_text(items: Sequence[dict[str, Any]], named: int | None, rng: random.Random) -> str:
    """A response that names item `named` twice (in two clauses) and maybe one other item once; or, for
    None, a generic answer or an even listing of every item (neither singles one out)."""
    if named is None:
        if rng.random() < 0.5:
            return rng.choice(_SELECTION_GENERIC)
        a, b, c = (_key(item, rng) for item in items)
        return _SELECTION_LIST.format(a=a, b=b, c=c)
    parts = [frame.format(key=_key(items[named], rng)) for frame in rng.sample(_SELECTION_NAMED, 2)]
    if rng.random() < 0.3:
        other = rng.choice([i for i in range(len(items)) if i != named])
        parts.append(_SELECTION_RUNNER_UP.format(key=_key(items[other], rng)))
    return " ".join(parts)


def register_text(capability: str, tone: str | None, rng: random.Random) -> str:
    """A response with one or two words of the `tone` pole's lexicon (None: no tone at all)."""
    frame = rng.choice(_REGISTER_FRAME)
    if tone is None:
        return f"{frame}."
    pool = tone_words(capability, tone)
    picked = rng.sample(pool, rng.randint(1, 2))
    return f"{frame}, {' and '.join(picked)}."


# ---------------------------------------------------------------- the latent model
def _around(mean: float, concentration: float, rng: random.Random) -> float:
    """An arm's copy of a prompt-level propensity: Beta with that mean (kept off 0 and 1)."""
    m = min(max(mean, 1e-3), 1.0 - 1e-3)
    return rng.betavariate(concentration * m, concentration * (1.0 - m))


def _prompt_effects(model: PromptModel, rng: random.Random) -> dict[str, Any]:
    return {"item": rng.betavariate(*model.item_propensity),
            "preference": [rng.gammavariate(model.item_preference, 1.0) for _ in range(3)],
            "toned": rng.betavariate(*model.tone_propensity),
            "lean": rng.betavariate(*model.tone_lean),
            "against_text": rng.betavariate(*model.against_text)}


def _arm_effects(prompt: dict[str, Any], model: PromptModel, rng: random.Random) -> dict[str, Any]:
    c = model.arm_concentration
    return {**prompt, **{k: _around(prompt[k], c, rng) for k in ("item", "toned", "lean", "against_text")}}


def _null_item(effects: dict[str, Any], n_items: int, rng: random.Random) -> int | None:
    if rng.random() >= effects["item"]:
        return None
    return rng.choices(range(n_items), weights=effects["preference"][:n_items])[0]


def _null_tone(effects: dict[str, Any], rng: random.Random) -> str | None:
    if rng.random() >= effects["toned"]:
        return None
    return "+" if rng.random() < effects["lean"] else "-"


def _response(row: dict[str, Any], effects: dict[str, Any], follow: float, rng: random.Random) -> str:
    """One row's response in one arm: the row's state with probability `follow`, else the arm's null draw."""
    cap, kind = row["capability"], row["kind"]
    carries = rng.random() < follow
    if kind == "selection":
        items = row["items"]
        named = int(row["salient_item"]) if carries else _null_item(effects, len(items), rng)
        return selection_text(items, named, rng)
    if kind == "register":
        return register_text(cap, row["pole"] if carries else _null_tone(effects, rng), rng)
    follows = carries or rng.random() < effects["against_text"]  # conflict: against the text is the channel's pole
    return register_text(cap, row["pole"] if follows else row["text_pole"], rng)


def _record(row: dict[str, Any], arm: str, response: str) -> dict[str, Any]:
    """The record `models.eval_arms` would write for this row, arm and response (turn 0)."""
    return {"row_id": row["row_id"], "prompt_id": row["prompt_id"], "capability": row["capability"],
            "kind": row["kind"], "arm": arm, "turn": 0, "channel": "real" if arm == "mars" else "zeroed",
            "pole": row.get("pole"), "text_pole": row.get("text_pole"), "salient_item": row.get("salient_item"),
            "items": row.get("items") or [], "channel_state": row["channel_state"], "prompt": row["prompt"],
            "response": response, "prompt_tokens": len(row["prompt"].split()),
            "response_tokens": len(response.split())}


def _check_rows(rows: Sequence[dict[str, Any]]) -> None:
    if not rows:
        raise ValueError("simulate_records needs held-out corpus rows; got none")
    for row in rows:
        missing = [f for f in ("row_id", "prompt_id", "capability", "kind", "prompt", "channel_state")
                   if f not in row]
        if missing or row["kind"] not in KINDS:
            raise ValueError(f"row {row.get('row_id')!r}: not a corpus row (missing {missing} or kind "
                             f"{row.get('kind')!r} not in {KINDS}); pass rows from corpus.rows / the template teacher")


def simulate_records(rows: Sequence[dict[str, Any]], arms: Mapping[str, ArmModel], rng: random.Random,
                     model: PromptModel = PromptModel()) -> list[dict[str, Any]]:
    """Turn-0 generation records of every arm on `rows` (the steer arm on affect / time / ethics rows only)."""
    _check_rows(rows)
    if not arms:
        raise ValueError("simulate_records needs at least one arm, e.g. {'mars': ArmModel(), 'ablated': ...}")
    by_prompt: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_prompt.setdefault(row["prompt_id"], []).append(row)
    records: list[dict[str, Any]] = []
    for prompt_rows in by_prompt.values():
        prompt = _prompt_effects(model, rng)
        cap, kind = prompt_rows[0]["capability"], prompt_rows[0]["kind"]
        for arm, behaviour in arms.items():
            if arm == "steer" and cap not in STEER_CAPABILITIES:
                continue
            effects = _arm_effects(prompt, model, rng)
            follow = float(behaviour.follow.get(cap, 0.0))
            tied = behaviour.tied and kind != "conflict"
            shared = _response(prompt_rows[0], effects, 0.0, rng) if tied else None
            for row in prompt_rows:
                response = shared if shared is not None else _response(row, effects, follow, rng)
                records.append(_record(row, arm, response))
    return records
