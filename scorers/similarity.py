"""How different are two arms' responses to the same row? Lexical cosine distance, no model needed.

Each response becomes a bag of words (`scorers.text.words`: folded, whole words); the distance is
1 - cosine of the two count vectors: 0 for the same words in the same proportions, 1 for no word
in common. Two empty responses are identical (0); one empty response is maximally far (1).
A transparent stand-in for an embedding distance that any re-score reproduces exactly.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

from scorers.outcomes import turn_of
from scorers.text import words


def cosine_distance(a: str, b: str) -> float:
    """1 - cosine similarity of the two responses' word-count vectors."""
    ca, cb = Counter(words(a or "")), Counter(words(b or ""))
    if not ca and not cb:
        return 0.0
    if not ca or not cb:
        return 1.0
    if ca == cb:
        return 0.0  # exactly, not 1 - (1 - rounding)
    dot = sum(v * cb[w] for w, v in ca.items())
    norm = math.sqrt(sum(v * v for v in ca.values())) * math.sqrt(sum(v * v for v in cb.values()))
    return max(0.0, 1.0 - dot / norm)


def score_similarity(records: list[dict[str, Any]], capabilities: list[str],
                     pairs: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """Per capability (in the order given) and arm pair: distances over rows both arms answered (turn 0)."""
    by_key = {(r["capability"], r["kind"], r["row_id"], r["arm"]): r["response"] for r in records if turn_of(r) == 0}
    out = []
    for cap in capabilities:
        rows = sorted({(kind, rid) for c, kind, rid, _ in by_key if c == cap})
        for a, b in pairs:
            d = sorted(cosine_distance(by_key[(cap, *row, a)], by_key[(cap, *row, b)])
                       for row in rows if (cap, *row, a) in by_key and (cap, *row, b) in by_key)
            if not d:
                continue
            mid = len(d) // 2
            out.append({"capability": cap, "pair": f"{a}-{b}", "n": len(d), "mean": sum(d) / len(d),
                        "median": d[mid] if len(d) % 2 else (d[mid - 1] + d[mid]) / 2,
                        "identical": sum(x == 0.0 for x in d) / len(d)})
    return out
