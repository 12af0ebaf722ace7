"""Selection metric ("dominant"): does the response foreground the salient item and not the others?

An item is referenced through its key terms (``item["keys"]``), matched as whole words after
`scorers.text.fold` (case, accents, punctuation and possessives do not matter). A response that
lists every candidate equally is not a selection: that is the enumeration leak that made an
earlier keyword-presence metric pass a model that ignored the channel.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from scorers.text import count_phrase, words


def _keys(item: dict[str, Any]) -> list[list[str]]:
    seen: list[list[str]] = []
    for key in item.get("keys") or []:
        toks = words(str(key))
        if toks and toks not in seen:
            seen.append(toks)
    return seen


def item_mentions(response: str, items: Sequence[dict[str, Any]]) -> list[int]:
    """Occurrences of each item's key terms in the response (each distinct key counted, repeats included)."""
    toks = words(response or "")
    return [sum(count_phrase(toks, key) for key in _keys(item)) for item in items]


def dominant(response: str, items: Sequence[dict[str, Any]], salient: int) -> bool:
    """True when the salient item is referenced at least once and strictly more than every other item."""
    if not 0 <= salient < len(items):
        raise ValueError(f"salient item {salient} is out of range for {len(items)} items")
    counts = item_mentions(response, items)
    others = [c for i, c in enumerate(counts) if i != salient]
    return counts[salient] >= 1 and all(counts[salient] > c for c in others)
