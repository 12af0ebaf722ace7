"""The offline template teacher for corpus v2: free, no network, deterministic by seed.

Content goes verbatim in the prompt and state goes in the channel, and rows are counterfactual:
one prompt appears with every channel state it is generated for, each with its own target.
- selection (memory, identity, continuity): three candidate items in the prompt, three rows per
  prompt, each target foregrounds one item (its key terms, none of the others').
- register (affect, time, ethics): a neutral prompt, two rows with opposite poles; the target is the
  same answer core wrapped in the pole's register (warm/cold, morning/night, cautious/permissive).
- conflict (register capabilities, held out): the prompt text asserts one pole, the channel the
  other; the target follows the channel. Two rows per conflict prompt, one per channel pole.

Held out means held out: every prompt's split is decided before it is built, and it draws its
people, items, questions and answer cores only from its split's part of each entity pool
(`POOLS`, partitioned by `corpus.rows.pool_partition`). A held-out target therefore names no entity
that any train target names, and no train target repeats it; the corpus stage measures what is left
(`corpus.overlap`: the shared frames and register phrases). A persona is composed per prompt (name,
surname, craft), so the scenario space is far larger than any one pool.

Every target passes pre-flight (the eval's own scorers) before it is emitted; a failing prompt is
dropped whole and counted. The row contract, ids, split and pre-flight live in `corpus.rows` (the
hosted teacher, `corpus.teacher_corpus`, shares them and this module's prompt scenarios). All
content comes from `corpus/data/*.json`; randomness comes from
`random.Random` seeded per (seed, capability, purpose), so one capability's rows do not change
when another capability is added or removed.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from corpus.rows import (
    LETTERS,
    SPLITS,
    capability_rng,
    check_corpus_args,
    corpus_stats,
    flip,
    pool_partition,
    preflight_register,
    preflight_selection,
    prompt_id,
    prompt_splits,
    register_row,
    selection_row,
)
from tinymars.domain import ETHICS_CATEGORIES, REGISTER_CAPABILITIES, SELECTION_CAPABILITIES

MORNING_HOURS = (6, 7, 8, 9, 10)
NIGHT_HOURS = (21, 22, 23, 0, 1, 2)
MAGNITUDE = (0.6, 0.95)
DATA_DIR = Path(__file__).with_name("data")
ATTEMPTS_PER_PROMPT = 50
# Entity pools: name -> (data file, list in it, fewest entities per split). Each is partitioned between the
# splits once per (seed, heldout_fraction), whichever capability draws from it, so a held-out affect prompt's
# answer core is not in any train time prompt either. Frames (templates, openers, register phrases) are shared.
POOLS = {
    "names": ("personas", "names", 3),
    "surnames": ("personas", "surnames", 3),
    "crafts": ("personas", "crafts", 3),
    "identity_questions": ("personas", "identity_questions", 1),
    "memories": ("memories", "memories", 3),
    "threads": ("threads", "threads", 3),
    "neutral_prompts": ("registers", "neutral_prompts", 1),
    "ethics_prompts": ("registers", "ethics_prompts", 1),
}


@cache
def load_data(name: str) -> dict[str, Any]:
    """One data file from corpus/data (cached; callers must not mutate it)."""
    return json.loads((DATA_DIR / f"{name}.json").read_text(encoding="utf-8"))


@cache
def pool_entities(pool: str, split: str, heldout_fraction: float, seed: int) -> tuple[Any, ...]:
    """The entities of `pool` that prompts of `split` may use (cached; callers must not mutate them)."""
    file, key, at_least = POOLS[pool]
    entries = load_data(file)[key]
    held = pool_partition(pool, len(entries), heldout_fraction, seed, at_least)
    return tuple(e for i, e in enumerate(entries) if (i in held) == (split == "heldout"))


@dataclass(frozen=True)
class Side:
    """One side of the entity split: where a prompt of `split` draws its entities from. `generated` holds this
    side's part of the pools a teacher wrote (`corpus.scenarios`), already split; the others come from the
    shipped pools."""

    split: str
    heldout_fraction: float
    seed: int
    generated: Mapping[str, tuple[Any, ...]] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {self.split!r}")

    def pool(self, name: str) -> tuple[Any, ...]:
        if self.generated is not None and name in self.generated:
            return self.generated[name]
        return pool_entities(name, self.split, self.heldout_fraction, self.seed)


def entity_split_sizes(heldout_fraction: float, seed: int) -> dict[str, dict[str, int]]:
    """Entities per pool and split (for stats): how much of each pool only held-out prompts see."""
    return {pool: {split: len(pool_entities(pool, split, heldout_fraction, seed)) for split in SPLITS}
            for pool in POOLS}


def _cap_first(text: str) -> str:
    return text[:1].upper() + text[1:]


def _listing(texts: list[str]) -> str:
    return "; ".join(f"({letter}) {text}" for letter, text in zip(LETTERS, texts, strict=True))


# ---------------------------------------------------------------- pre-flight


# ---------------------------------------------------------------- selection prompts


def _memory_prompt(rng: random.Random, side: Side) -> tuple[str, list[dict[str, Any]], list[str]]:
    data = load_data("memories")
    first = rng.choice(side.pool("names"))
    mems = rng.sample(side.pool("memories"), 3)
    question, template = rng.choice(data["questions"]), rng.choice(data["templates"])
    listing = _listing([m["text"] for m in mems])
    prompt = data["prompt"].format(first=first, listing=listing, question=question)
    targets = [template.format(first=first, idea=m["idea"], why=m["why"]) for m in mems]
    return prompt, [{"text": m["text"], "keys": list(m["keys"])} for m in mems], targets


def _continuity_prompt(rng: random.Random, side: Side) -> tuple[str, list[dict[str, Any]], list[str]]:
    data = load_data("threads")
    first = rng.choice(side.pool("names"))
    threads = rng.sample(side.pool("threads"), 3)
    opener, template = rng.choice(data["openers"]), rng.choice(data["templates"])
    prompt = data["prompt"].format(first=first, listing=_listing([t["text"] for t in threads]), opener=opener)
    targets = [template.format(first=first, topic=t["topic"], step=t["step"]) for t in threads]
    return prompt, [{"text": t["text"], "keys": list(t["keys"])} for t in threads], targets


def persona(first: str, surname: str, craft: dict[str, Any]) -> dict[str, Any]:
    """A persona composed of a name and a craft: its item text, the keys the scorer counts (the first name and
    the craft's terms), and what the template teacher speaks with."""
    return {"first": first, "role": craft["role"], "lens": craft["lens"],
            "description": f"{first} {surname}, {craft['role']} who {craft['activity']}",
            "keys": [first, *craft["keys"]]}


def _identity_prompt(rng: random.Random, side: Side) -> tuple[str, list[dict[str, Any]], list[str]]:
    data = load_data("personas")
    firsts, surnames = rng.sample(side.pool("names"), 3), rng.sample(side.pool("surnames"), 3)
    people = [persona(f, s, c) for f, s, c in zip(firsts, surnames, rng.sample(side.pool("crafts"), 3), strict=True)]
    q, template = rng.choice(side.pool("identity_questions")), rng.choice(data["identity_templates"])
    prompt = data["identity_prompt"].format(
        listing=_listing([p["description"] for p in people]), question=q["question"]
    )
    targets = [
        template.format(
            first=p["first"],
            role=p["role"],
            answer=q["answer"],
            Answer=_cap_first(q["answer"]),
            lens=p["lens"],
        )
        for p in people
    ]
    return prompt, [{"text": p["description"], "keys": list(p["keys"])} for p in people], targets


SELECTION_BUILDERS = {
    "memory": _memory_prompt,
    "identity": _identity_prompt,
    "continuity": _continuity_prompt,
}


def selection_prompt(
    capability: str, rng: random.Random, seen: set[str], side: Side
) -> tuple[str, list[dict[str, Any]], list[str]]:
    """A new selection prompt for this capability from `side`'s entities: (prompt, its three items, the
    template's three targets)."""
    return _fresh(capability, rng, seen, lambda: SELECTION_BUILDERS[capability](rng, side), side)


def _selection_rows(
    capability: str, number: int, rng: random.Random, seen: set[str], side: Side
) -> tuple[list[dict], int]:
    """Rows for one selection prompt (3, or none when pre-flight rejects it) and the rejected count."""
    prompt, items, targets = selection_prompt(capability, rng, seen, side)
    if not all(preflight_selection(items, i, t) for i, t in enumerate(targets)):
        return [], 1
    pid = prompt_id(capability, number)
    return [selection_row(capability, pid, side.split, prompt, items, i, target)
            for i, target in enumerate(targets)], 0


# ---------------------------------------------------------------- register prompts


def _register_base(capability: str, rng: random.Random, side: Side) -> dict[str, Any]:
    """The neutral question, its answer core, the person asking and the shared (non-pole) state."""
    data = load_data("registers")
    q = rng.choice(side.pool("ethics_prompts" if capability == "ethics" else "neutral_prompts"))
    return {
        "first": rng.choice(side.pool("names")),
        "opener": rng.choice(data["prompt_openers"]),
        "question": q["question"],
        "core": q["core"],
        "category": q.get("category"),
        "saliency": round(rng.random(), 3),
        "weekday": rng.randrange(7),
    }


def register_wrap(capability: str, pole: str, rng: random.Random) -> tuple[str, str]:
    """An opener and a closer from the pole's phrase bank."""
    bank = load_data("registers")["banks"][capability][pole]
    opener = rng.choice(bank["openers"])
    return opener, rng.choice(bank["closers"])


def register_target(capability: str, pole: str, core: str, rng: random.Random) -> str:
    """The answer core wrapped in the pole's register: `opener core closer`."""
    opener, closer = register_wrap(capability, pole, rng)
    return f"{opener} {core} {closer}"


def register_state(capability: str, pole: str, base: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    """Raw channel state for a pole; only the pole-carrying value differs between the two rows of a prompt."""
    sign = 1.0 if pole == "+" else -1.0
    if capability == "affect":
        return {"valence": round(sign * rng.uniform(*MAGNITUDE), 3), "saliency": base["saliency"]}
    if capability == "time":
        return {"hour": rng.choice(MORNING_HOURS if pole == "+" else NIGHT_HOURS), "weekday": base["weekday"]}
    if base["category"] not in ETHICS_CATEGORIES:
        raise ValueError(f"ethics prompt {base['question']!r} has unknown category {base['category']!r}")
    return {"caution": round(sign * rng.uniform(*MAGNITUDE), 3), "category": base["category"]}


def register_prompt(
    capability: str, rng: random.Random, seen: set[str], conflict: bool, side: Side
) -> dict[str, Any]:
    """A new register (or conflict) prompt from `side`'s entities: `_register_base` plus `texts`, the prompt
    text per channel pole."""
    data = load_data("registers")

    def build() -> tuple[str, dict[str, Any]]:
        base = _register_base(capability, rng, side)
        if conflict:
            # the text asserts the pole opposite to each row's channel pole
            texts = {
                pole: data["conflict_prompt"].format(
                    first=base["first"],
                    question=base["question"],
                    assertion=rng.choice(data["banks"][capability][flip(pole)]["assertions"]),
                )
                for pole in ("+", "-")
            }
        else:
            texts = dict.fromkeys(("+", "-"), data["prompt"].format(**base))
        base["texts"] = texts
        return "\n".join(dict.fromkeys(texts.values())), base

    return _fresh(capability, rng, seen, build, side)[1]


def _register_rows(
    capability: str, number: int, rng: random.Random, seen: set[str], conflict: bool, side: Side
) -> tuple[list[dict], int]:
    """Two rows (+ and - channel pole) for one register or conflict prompt, or none when rejected."""
    base = register_prompt(capability, rng, seen, conflict, side)
    targets = {pole: register_target(capability, pole, base["core"], rng) for pole in ("+", "-")}
    if not preflight_register(capability, targets["+"], targets["-"]):
        return [], 1
    pid = prompt_id(capability, number, conflict)
    return [
        register_row(capability, pid, side.split, base, pole, conflict, register_state(capability, pole, base, rng),
                     targets[pole])
        for pole in ("+", "-")
    ], 0


# ---------------------------------------------------------------- assembly


def _fresh(capability: str, rng: random.Random, seen: set[str], build: Callable[[], tuple], side: Side) -> tuple:
    """Call `build` until its prompt text (first element) is new for this capability."""
    for _ in range(ATTEMPTS_PER_PROMPT):
        out = build()
        if out[0] not in seen:
            seen.add(out[0])
            return out
    raise ValueError(
        f"{capability}: the template pools ran out of distinct {side.split} prompts after {len(seen)} prompts; "
        "lower corpus.prompts_per_capability, change corpus.heldout_fraction or extend corpus/data"
    )


def _capability_rows(
    capability: str, prompts: int, conflicts: int, heldout_fraction: float, seed: int
) -> tuple[list[dict], int, int]:
    """All rows of one capability (regular prompts, then conflict prompts) and rejected prompt counts.

    A rejected prompt keeps its number, so its id is a gap. Each prompt's split is drawn before it is built
    (`prompt_splits`) and its entities come from that split's pools; conflict prompts are held out.
    Conflict prompts have their own random stream, so they do not move when `prompts` changes.
    """
    rng, seen = capability_rng(seed, capability, "prompts"), set()
    rows: list[dict] = []
    rejected = rejected_conflict = 0
    for number, split in enumerate(prompt_splits(capability, prompts, heldout_fraction, seed)):
        side = Side(split, heldout_fraction, seed)
        if capability in SELECTION_CAPABILITIES:
            new, bad = _selection_rows(capability, number, rng, seen, side)
        else:
            new, bad = _register_rows(capability, number, rng, seen, False, side)
        rows += new
        rejected += bad
    if capability in REGISTER_CAPABILITIES:
        conflict_rng, held_out = capability_rng(seed, capability, "conflict"), Side("heldout", heldout_fraction, seed)
        for number in range(conflicts):
            new, bad = _register_rows(capability, number, conflict_rng, seen, True, held_out)
            rows += new
            rejected_conflict += bad
    return rows, rejected, rejected_conflict


def generate_corpus(
    capabilities: list[str],
    prompts_per_capability: int,
    conflict_prompts_per_capability: int,
    heldout_fraction: float,
    seed: int,
) -> tuple[list[dict], dict]:
    """Corpus v2 rows (ARCHITECTURE.md schema) and stats: rows per capability / kind / split, rejections,
    entities per pool and split.

    `rejected` counts prompts (each a set of 3 selection rows or 2 register/conflict rows) dropped by
    pre-flight, per capability. Conflict prompts are generated for register capabilities only.
    """
    check_corpus_args(capabilities, prompts_per_capability, conflict_prompts_per_capability, heldout_fraction)
    per_capability = {
        cap: _capability_rows(cap, prompts_per_capability, conflict_prompts_per_capability, heldout_fraction, seed)
        for cap in capabilities
    }
    rows, stats = corpus_stats(per_capability)
    stats["entities"] = entity_split_sizes(heldout_fraction, seed)
    return rows, stats


