"""How held out is the held-out split: exact and near-duplicate targets across it, per capability.

A held-out target that a train target repeats (or nearly repeats) measures memorisation, not
generalisation: held-out loss, bits per byte and the relief valve would all flatter the model.
- *exact duplicate*: the held-out target's word sequence (`scorers.text.words`: case, accents and
  punctuation folded) equals some train target's;
- *near duplicate*: the word `NGRAM`-gram shingle sets of the held-out target and of its nearest train
  target have Jaccard similarity >= the threshold (an exact duplicate has Jaccard 1, so it is a near
  duplicate too).
Every held-out row (conflict rows included) is compared with every train row of any capability
(replay rows included): the model trains on all of them. The nearest train target is found exactly,
not estimated: the intersections are one sparse matrix product per block of held-out rows.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
from scipy import sparse

from scorers.text import words

NGRAM = 3  # word 3-grams: a shared template frame of a few words barely moves the Jaccard, a shared sentence does
BLOCK_CELLS = 4_000_000  # held-out rows x train rows compared per dense block (~32 MB of float64)
WORST_SHOWN = 3


class HeldoutOverlapError(ValueError):
    """The held-out split repeats train content above the profile's thresholds. `teacher_calls` carries the
    paid calls of the stage that measured it, so lineage keeps them although no artifact is published."""

    def __init__(self, message: str, teacher_calls: list[dict[str, Any]] | None = None):
        super().__init__(message)
        self.teacher_calls = teacher_calls or []


def shingles(text: str, n: int = NGRAM) -> set[tuple[str, ...]]:
    """The word n-grams of a text; a text shorter than n words is one shingle (itself), an empty one none."""
    return _shingles(tuple(words(text)), n)


def _shingles(toks: tuple[str, ...], n: int) -> set[tuple[str, ...]]:
    if len(toks) < n:
        return {tuple(toks)} if toks else set()
    return {tuple(toks[i : i + n]) for i in range(len(toks) - n + 1)}


def jaccard(a: set, b: set) -> float:
    """|a & b| / |a | b| (0 for two empty sets): the reference the sparse computation must agree with."""
    union = len(a | b)
    return len(a & b) / union if union else 0.0


def _matrix(sets: list[set], vocab: dict[tuple[str, ...], int], grow: bool) -> sparse.csr_matrix:
    """Rows = shingle sets, columns = `vocab` ids (new shingles get ids only when `grow`)."""
    indptr, indices = [0], []
    for s in sets:
        for g in s:
            col = vocab.setdefault(g, len(vocab)) if grow else vocab.get(g)
            if col is not None:
                indices.append(col)
        indptr.append(len(indices))
    data = np.ones(len(indices), dtype=np.float64)
    return sparse.csr_matrix((data, np.array(indices, dtype=np.int64), np.array(indptr, dtype=np.int64)),
                             shape=(len(sets), max(len(vocab), 1)))


def nearest_train(heldout: list[set], train: list[set]) -> tuple[np.ndarray, np.ndarray]:
    """For each held-out shingle set: the largest Jaccard against any train set, and that train set's index
    (-1 when there is no train set or nothing in common)."""
    best = np.zeros(len(heldout), dtype=np.float64)
    where = np.full(len(heldout), -1, dtype=np.int64)
    if not heldout or not train:
        return best, where
    vocab: dict[tuple[str, ...], int] = {}
    t = _matrix(train, vocab, grow=True)
    h = _matrix(heldout, vocab, grow=False)
    t_sizes = np.array([len(s) for s in train], dtype=np.float64)
    h_sizes = np.array([len(s) for s in heldout], dtype=np.float64)
    t_transposed = t.T.tocsc()
    block = max(1, BLOCK_CELLS // len(train))
    for start in range(0, len(heldout), block):
        stop = min(start + block, len(heldout))
        inter = (h[start:stop] @ t_transposed).toarray()
        union = h_sizes[start:stop, None] + t_sizes[None, :] - inter
        sim = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
        idx = sim.argmax(axis=1)
        top = sim[np.arange(stop - start), idx]
        best[start:stop] = top
        where[start:stop] = np.where(top > 0, idx, -1)
    return best, where


def split_overlap(rows: Iterable[dict[str, Any]], jaccard_threshold: float, n: int = NGRAM) -> dict[str, Any]:
    """Exact and near-duplicate held-out targets against the train split, per held-out capability and in total.

    Per capability: train and held-out rows, `exact_duplicates`, `near_duplicates` (nearest Jaccard >=
    `jaccard_threshold`), `near_duplicate_rate`, `max_jaccard`, `mean_nearest_jaccard` and the `worst`
    held-out rows with their nearest train row.
    """
    rows = list(rows)
    train = [r for r in rows if r["split"] == "train"]
    heldout = [r for r in rows if r["split"] == "heldout"]
    tokens: dict[str, tuple[str, ...]] = {}  # template corpora repeat targets: fold each distinct one once
    for r in rows:
        if r["target"] not in tokens:
            tokens[r["target"]] = tuple(words(r["target"]))
    train_tokens = {tokens[r["target"]] for r in train}
    exact = np.array([tokens[r["target"]] in train_tokens for r in heldout], dtype=bool)
    best, where = nearest_train([_shingles(tokens[r["target"]], n) for r in heldout],
                                [_shingles(tokens[r["target"]], n) for r in train])
    near = best >= jaccard_threshold
    capabilities = list(dict.fromkeys(r["capability"] for r in rows))
    by_capability = {}
    for cap in capabilities:
        mask = np.array([r["capability"] == cap for r in heldout], dtype=bool)
        summary = _summary(mask, exact, near, best)
        order = [i for i in np.argsort(-best, kind="stable") if mask[i] and where[i] >= 0][:WORST_SHOWN]
        summary["worst"] = [{"row_id": heldout[i]["row_id"], "nearest_train_row_id": train[where[i]]["row_id"],
                             "jaccard": round(float(best[i]), 4)} for i in order]
        by_capability[cap] = {"train_rows": sum(r["capability"] == cap for r in train), **summary}
    total = {"train_rows": len(train), **_summary(np.ones(len(heldout), dtype=bool), exact, near, best)}
    return {"ngram": n, "jaccard_threshold": jaccard_threshold, "by_capability": by_capability, "total": total}


def _summary(mask: np.ndarray, exact: np.ndarray, near: np.ndarray, best: np.ndarray) -> dict[str, Any]:
    count = int(mask.sum())
    return {
        "heldout_rows": count,
        "exact_duplicates": int(exact[mask].sum()),
        "near_duplicates": int(near[mask].sum()),
        "near_duplicate_rate": round(float(near[mask].mean()), 4) if count else 0.0,
        "max_jaccard": round(float(best[mask].max()), 4) if count else 0.0,
        "mean_nearest_jaccard": round(float(best[mask].mean()), 4) if count else 0.0,
    }


def overlap_lines(report: dict[str, Any]) -> list[str]:
    """The figures as log lines: one per capability with held-out rows, then the total."""
    head = (f"[corpus] held-out vs train targets (word {report['ngram']}-gram Jaccard, near duplicate >= "
            f"{report['jaccard_threshold']:g}):")
    lines = [head]
    for cap, s in [*report["by_capability"].items(), ("total", report["total"])]:
        if s["heldout_rows"] == 0 and cap != "total":
            continue
        lines.append(f"[corpus]   {cap:<10} {s['train_rows']:>6} train {s['heldout_rows']:>5} held-out rows, "
                     f"{s['exact_duplicates']} exact duplicates, near-duplicate rate {s['near_duplicate_rate']:.2%} "
                     f"({s['near_duplicates']}), max Jaccard {s['max_jaccard']:.2f}, "
                     f"mean nearest {s['mean_nearest_jaccard']:.2f}")
    return lines


def overlap_failures(report: dict[str, Any], max_exact: int, max_near_rate: float) -> list[str]:
    """What breaks the profile's limits (empty when the split is held out enough); each names its field."""
    failures = []
    total = report["total"]
    if total["exact_duplicates"] > max_exact:
        per_cap = ", ".join(f"{cap} {s['exact_duplicates']}" for cap, s in report["by_capability"].items()
                            if s["exact_duplicates"])
        failures.append(f"{total['exact_duplicates']} held-out targets repeat a train target exactly ({per_cap}); "
                        f"corpus.max_exact_duplicate_targets is {max_exact}")
    for cap, s in report["by_capability"].items():
        if s["heldout_rows"] and s["near_duplicate_rate"] > max_near_rate:
            worst = "; ".join(f"{w['row_id']} ~ {w['nearest_train_row_id']} (Jaccard {w['jaccard']:.2f})"
                              for w in s["worst"])
            failures.append(f"{cap}: {s['near_duplicates']} of {s['heldout_rows']} held-out targets "
                            f"({s['near_duplicate_rate']:.2%}) have a train target with word {report['ngram']}-gram "
                            f"Jaccard >= {report['jaccard_threshold']:g} (corpus.near_duplicate_jaccard); "
                            f"corpus.max_near_duplicate_rate is {max_near_rate:g}; nearest: {worst}")
    return failures
