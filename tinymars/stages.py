"""The stage graph: which stage feeds which, so `--refresh X` can force X and everything downstream."""

from __future__ import annotations

from collections.abc import Iterable

PARENTS: dict[str, tuple[str, ...]] = {
    "corpus": (),
    "channels": ("corpus",),
    "tokenizer": ("corpus",),
    "pack": ("corpus", "channels", "tokenizer"),
    "train": ("pack",),
    "steer": ("corpus", "tokenizer", "train"),
    "eval": ("corpus", "channels", "tokenizer", "pack", "train", "steer"),
    "report": ("corpus", "pack", "train", "eval"),
}
ORDER = tuple(PARENTS)


def downstream(stages: Iterable[str]) -> set[str]:
    """The given stages plus every stage that (transitively) consumes them."""
    chosen = set(stages)
    unknown = chosen - set(PARENTS)
    if unknown:
        raise ValueError(f"--refresh: unknown stage(s) {sorted(unknown)}; allowed: {', '.join(ORDER)}")
    changed = True
    while changed:
        changed = False
        for stage, parents in PARENTS.items():
            if stage not in chosen and chosen.intersection(parents):
                chosen.add(stage)
                changed = True
    return chosen
