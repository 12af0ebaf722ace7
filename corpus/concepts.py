"""Concepts for steering: paired texts per state capability, and the one map from a channel state to a sign.

A concept is one of the register capabilities (affect, time, ethics). Its paired texts come from
the corpus's `register` rows: the same prompt answered at the `+` and the `-` pole. The prompt on
its own is the neutral baseline (the same scenario, no register yet), which the subspace method
uses as its shared negatives.

A text is `prompt + TEXT_SEP + target`; `split_text` undoes that, so the native model can see the
exact layout it was trained on (`[bos] prompt <target> target`) while a Hugging Face model reads the
plain string.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from corpus.encode import phase_of
from tinymars.domain import CONCEPTS

TEXT_SEP = "\n"
# time has no signed scalar in its state: the circadian phase goes from morning (+) to night (-)
PHASE_SIGN = {"morning": 1.0, "afternoon": 1.0 / 3.0, "evening": -1.0 / 3.0, "night": -1.0}


def _check(concept: str) -> None:
    if concept not in CONCEPTS:
        raise ValueError(f"concept: unknown '{concept}'; allowed: {', '.join(CONCEPTS)}")


def join_text(prompt: str, target: str) -> str:
    return f"{prompt}{TEXT_SEP}{target}"


def split_text(text: str) -> tuple[str, str | None]:
    """(prompt, target); target is None for a baseline (prompt-only) text."""
    prompt, sep, target = text.partition(TEXT_SEP)
    return (prompt, target) if sep else (prompt, None)


def concept_pairs(rows: list[dict], concept: str, limit: int | None = None) -> tuple[list[str], list[str], list[str]]:
    """(positives, negatives, baselines): texts framing the same scenario at the concept's positive and
    negative pole, and neutral baseline texts (shared negatives for the subspace method).

    Train-split register rows only (the eval reads heldout rows), paired by prompt id in sorted order
    so the same corpus always gives the same pairs; `limit` keeps the first pairs.
    """
    _check(concept)
    poles: dict[str, dict[str, dict[str, Any]]] = {}
    for row in rows:
        if row.get("capability") == concept and row.get("kind") == "register" and row.get("split") == "train":
            poles.setdefault(row["prompt_id"], {})[row["pole"]] = row
    pairs = [(p["+"], p["-"]) for _, p in sorted(poles.items()) if "+" in p and "-" in p]
    pairs = pairs[:limit] if limit is not None else pairs
    positives = [join_text(pos["prompt"], pos["target"]) for pos, _ in pairs]
    negatives = [join_text(neg["prompt"], neg["target"]) for _, neg in pairs]
    baselines = [pos["prompt"] for pos, _ in pairs]
    return positives, negatives, baselines


def concept_coefficient(concept: str, channel_state: dict) -> float:
    """Signed strength in [-1, 1]: where this row's state sits between the concept's negative (-1) and
    positive (+1) pole. The ONE place that maps a channel state to a steering sign (B uses it per eval row).

    Accepts a row's whole `channel_state` ({"affect": {...}}) or the concept's own state; a row that
    does not set this concept gets 0 (no steering).
    """
    _check(concept)
    state = channel_state.get(concept, channel_state) if isinstance(channel_state, dict) else {}
    if concept == "affect" and "valence" in state:
        value = float(state["valence"])
    elif concept == "ethics" and "caution" in state:
        value = float(state["caution"])
    elif concept == "time" and "hour" in state:
        value = PHASE_SIGN[phase_of(int(state["hour"]))]
    else:
        return 0.0
    return max(-1.0, min(1.0, value))


ConceptTexts = dict[str, tuple[list[str], list[str], list[str]]]


def corpus_concepts(rows: list[dict], limit: int | None = None) -> ConceptTexts:
    """concept_pairs for every concept the corpus has pairs for, in CONCEPTS order."""
    out = {c: concept_pairs(rows, c, limit) for c in CONCEPTS}
    return {c: texts for c, texts in out.items() if texts[0]}


def read_paired_jsonl(path: Path, limit: int | None = None) -> ConceptTexts:
    """A researcher's own pairs: one JSON object a line, {"concept", "positive", "negative"} and an optional
    neutral "baseline" (a concept with none uses its negatives as the subspace method's base set).
    Concepts keep first-seen order."""
    out: ConceptTexts = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{n}: not valid JSON ({exc.msg}); one JSON object per line") from None
            fields = ("concept", "positive", "negative")
            bad = [k for k in fields if not isinstance(rec, dict) or not isinstance(rec.get(k), str) or not rec[k]]
            if bad:
                raise ValueError(f"{path}:{n}: needs non-empty strings 'concept', 'positive', 'negative' "
                                 f"(and optionally 'baseline'); missing or empty: {', '.join(bad) or 'all'}")
            pos, neg, base = out.setdefault(rec["concept"], ([], [], []))
            if limit is None or len(pos) < limit:
                pos.append(rec["positive"])
                neg.append(rec["negative"])
                if rec.get("baseline"):
                    base.append(rec["baseline"])
    if not out:
        raise ValueError(f"{path}: no pairs; write one JSON object per line with concept, positive, negative")
    return out
