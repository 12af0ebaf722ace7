"""The stage graph: which stage feeds which, so `--refresh X` can force X and everything downstream.
`replay` runs only when the profile has a replay section.

`generate` (the model's responses: keyed by model, prompts, decoding) and `score` (pure statistics on
saved generations: alpha, hypotheses, bootstrap) are two stages, so a re-scoring never regenerates.
The old single stage's name `eval` stays an alias for both in `--refresh` and `--only`.
"""

from __future__ import annotations

from collections.abc import Iterable

PARENTS: dict[str, tuple[str, ...]] = {
    "corpus": (),
    "channels": ("corpus",),
    "tokenizer": ("corpus",),
    "replay": ("tokenizer",),  # a profile without a replay section skips it
    "pack": ("corpus", "channels", "tokenizer"),
    "train": ("pack", "replay"),
    "steer": ("corpus", "tokenizer", "train"),
    "generate": ("corpus", "channels", "tokenizer", "pack", "train", "steer"),
    "score": ("generate",),
    "report": ("corpus", "pack", "train", "steer", "score"),
}
ORDER = tuple(PARENTS)
# Former stage names -> the stages they became (in order); accepted wherever a stage is named.
ALIASES: dict[str, tuple[str, ...]] = {"eval": ("generate", "score")}
ALIAS_NOTE = "; ".join(f"{a} = {' + '.join(s)}" for a, s in ALIASES.items())


def _allowed() -> str:
    return f"{', '.join(ORDER)} ({ALIAS_NOTE})"


def expand(stages: Iterable[str], option: str = "--refresh") -> set[str]:
    """Stage names with aliases replaced by the stages they stand for; an unknown name is an error."""
    chosen = set()
    for name in stages:
        chosen.update(ALIASES.get(name, (name,)))
    unknown = chosen - set(PARENTS)
    if unknown:
        raise ValueError(f"{option}: unknown stage(s) {sorted(unknown)}; allowed: {_allowed()}")
    return chosen


def downstream(stages: Iterable[str]) -> set[str]:
    """The given stages (aliases expanded) plus every stage that (transitively) consumes them."""
    chosen = expand(stages)
    changed = True
    while changed:
        changed = False
        for stage, parents in PARENTS.items():
            if stage not in chosen and chosen.intersection(parents):
                chosen.add(stage)
                changed = True
    return chosen


def last_stage(name: str) -> str:
    """The stage `--only NAME` stops after: the name itself, or an alias's last stage (eval -> score)."""
    stages = ALIASES.get(name, (name,))
    if stages[-1] not in PARENTS:
        raise ValueError(f"--only: unknown stage '{name}'; allowed: {_allowed()}")
    return stages[-1]
