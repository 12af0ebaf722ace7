"""Register metric ("directional"): does the + pole response read warmer / more morning / more cautious?

`register_score` is a transparent count, not a model: (+ pole lexicon hits) - (- pole lexicon hits),
using `lexicons.json`. Phrases match whole words, longest entry first. A hit with a negator
("not", "no", "never", ...) among the `negation_window` words before it in the same clause counts
for the opposite pole ("not warm" is cold, "don't worry" is permissive). Raw counts (not per word)
keep the score readable; the directional test compares two responses to the same prompt, so
length effects largely cancel. An empty response scores 0.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

from scorers.text import clauses, words
from tinymars.domain import REGISTER_CAPABILITIES

LEXICON_PATH = Path(__file__).with_name("lexicons.json")
POLES = ("+", "-")


@cache
def lexicons() -> dict[str, Any]:
    """The parsed lexicon file (cached): per capability, per pole, a list of words or phrases."""
    return json.loads(LEXICON_PATH.read_text(encoding="utf-8"))


@cache
def _phrases(capability: str) -> tuple[dict[tuple[str, ...], str], int]:
    if capability not in REGISTER_CAPABILITIES:
        raise ValueError(f"no register lexicon for capability {capability!r}; known: {REGISTER_CAPABILITIES}")
    table: dict[tuple[str, ...], str] = {}
    for pole in POLES:
        for entry in lexicons()[capability][pole]:
            table[tuple(words(entry))] = pole
    return table, max(len(k) for k in table)


def register_hits(text: str, capability: str) -> tuple[int, int]:
    """(+ pole hits, - pole hits) after negation flips."""
    table, longest = _phrases(capability)
    negators = set(lexicons()["negators"])
    window = int(lexicons()["negation_window"])
    plus = minus = 0
    for toks in clauses(text or ""):
        i = 0
        while i < len(toks):
            for size in range(min(longest, len(toks) - i), 0, -1):
                pole = table.get(tuple(toks[i : i + size]))
                if pole is not None:
                    break
            else:
                i += 1
                continue
            negated = any(t in negators for t in toks[max(0, i - window) : i])
            if (pole == "+") != negated:
                plus += 1
            else:
                minus += 1
            i += size
    return plus, minus


def register_score(text: str, capability: str) -> float:
    """(+ hits) - (- hits): positive reads as the + pole (warm / morning / cautious)."""
    plus, minus = register_hits(text, capability)
    return float(plus - minus)


def register_gap(plus_text: str, minus_text: str, capability: str) -> float:
    """Score of the + pole response minus score of the - pole response."""
    return register_score(plus_text, capability) - register_score(minus_text, capability)


def directional(plus_text: str, minus_text: str, capability: str) -> bool:
    """True when the + pole response scores strictly higher than the - pole response (a tie is not)."""
    return register_gap(plus_text, minus_text, capability) > 0


def follows_pole(text: str, capability: str, pole: str) -> bool:
    """True when the response's score is nonzero and has the sign of `pole` (used for conflict rows)."""
    if pole not in POLES:
        raise ValueError(f"pole must be '+' or '-', got {pole!r}")
    score = register_score(text, capability)
    return score > 0 if pole == "+" else score < 0


@cache
def _vader() -> Any:
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def vader_compound(text: str) -> float:
    """VADER compound sentiment in [-1, 1], a second, independent affect instrument; empty text is 0."""
    if not (text or "").strip():
        return 0.0
    return float(_vader().polarity_scores(text)["compound"])
