"""Selection metric ("dominant"): does the response foreground the salient item and not the others?

An item is referenced through its key terms (``item["keys"]``), matched as whole words after
`scorers.text.fold` (case, accents, punctuation and possessives do not matter). The unit counted is a
*reference*, not a key-term hit: one mention that happens to use two of an item's keys ("her sister's
Lisbon trip") is one reference, so an item with several keys is not favoured over one named once.

The rule (`item_mentions`): the item's key-term matches are sorted by position; a match continues the
current reference when it overlaps or touches it, or when it sits in the same clause
(`scorers.text.clauses`: commas, full stops, semicolons, colons, dashes and brackets end a clause) with
at most `MAX_BRIDGE` words in between, every one of them in `scorers.text.FUNCTION_WORDS` ("Rex the
beagle", "Lisbon with your sister"). Each maximal run is one reference. A key in another clause
("Rex, the beagle"; "Rex. Rex loves it.") or after a content word ("Rex loves his beagle") starts
another reference. A key listed twice in ``keys`` is matched once.

A response that lists every candidate equally is not a selection: that is the enumeration leak that
made an earlier keyword-presence metric pass a model that ignored the channel.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from scorers.text import FUNCTION_WORDS, clause_tokens, phrase_spans, words

MAX_BRIDGE = 3  # function words allowed between two key terms of one reference


def _keys(item: dict[str, Any]) -> list[list[str]]:
    seen: list[list[str]] = []
    for key in item.get("keys") or []:
        toks = words(str(key))
        if toks and toks not in seen:
            seen.append(toks)
    return seen


def _references(tokens: list[str], clause_of: list[int], keys: list[list[str]]) -> int:
    """Maximal runs of overlapping, touching or function-word-bridged key matches (bridges stay in a clause)."""
    runs, end = 0, 0
    for start, stop in sorted(span for key in keys for span in phrase_spans(tokens, key)):
        gap = tokens[end:start]
        bridged = (runs > 0 and clause_of[end - 1] == clause_of[start] and len(gap) <= MAX_BRIDGE
                   and all(w in FUNCTION_WORDS for w in gap))
        if runs == 0 or (start >= end and not bridged):
            runs += 1
        end = max(end, stop)
    return runs


def item_mentions(response: str, items: Sequence[dict[str, Any]]) -> list[int]:
    """References to each item in the response (the module docstring states what one reference is)."""
    tokens, clause_of = clause_tokens(response or "")
    return [_references(tokens, clause_of, _keys(item)) for item in items]


def dominant(response: str, items: Sequence[dict[str, Any]], salient: int) -> bool:
    """True when the salient item is referenced at least once and strictly more than every other item."""
    if not 0 <= salient < len(items):
        raise ValueError(f"salient item {salient} is out of range for {len(items)} items")
    counts = item_mentions(response, items)
    others = [c for i, c in enumerate(counts) if i != salient]
    return counts[salient] >= 1 and all(counts[salient] > c for c in others)
