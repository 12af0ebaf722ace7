"""Corpus rows (corpus v2): the row contract, ids, the split, pre-flight, stats, and reading them back.

Both teachers (the offline template teacher and a hosted one, `corpus.teacher_corpus`) emit rows
through these functions, so a row looks the same whoever wrote its target. The schema is in
ARCHITECTURE.md ("Corpus rows"). Pre-flight uses the eval's own scorers: a target that would fail
its own metric never enters the corpus.

The split is decided before any prompt is built, on two levels: each prompt number is train or
held out (`prompt_splits`), and each entity pool (people, memories, threads, questions, answer
cores) is partitioned between the splits (`pool_partition`); a prompt draws its entities from its
own split's part only, so no held-out prompt shares an entity with any train prompt.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from scorers.register import register_score, vader_compound
from scorers.selection import dominant, item_mentions
from tinymars.domain import CAPABILITIES

ID_PREFIX = {"memory": "mem", "identity": "idn", "continuity": "cnt",
             "affect": "aff", "time": "tim", "ethics": "eth"}  # fmt: skip
POLE_SUFFIX = {"+": "pos", "-": "neg"}
SPLITS = ("train", "heldout")
LETTERS = "abc"
ROW_FIELDS = ("row_id", "prompt_id", "capability", "kind", "split", "prompt", "items", "salient_item", "pole",
              "text_pole", "channel_state", "target")  # fmt: skip


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a `corpus.jsonl`, in file order."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def preflight_selection(items: list[dict[str, Any]], salient: int, target: str) -> bool:
    """A selection target passes when `dominant` holds for the salient item and no other item is named."""
    counts = item_mentions(target, items)
    others_silent = all(c == 0 for i, c in enumerate(counts) if i != salient)
    return dominant(target, items, salient) and others_silent


def preflight_register(capability: str, plus_target: str, minus_target: str) -> bool:
    """A register pair passes when each target scores with its own pole's sign (so + beats -), plus VADER
    agreeing for affect: exactly what the directional and conflict scorers will ask of a model."""
    plus, minus = register_score(plus_target, capability), register_score(minus_target, capability)
    ok = plus > 0 > minus
    if capability == "affect":
        ok = ok and vader_compound(plus_target) > vader_compound(minus_target)
    return ok


def prompt_id(capability: str, number: int, conflict: bool = False) -> str:
    return f"{ID_PREFIX[capability]}-{'c-' if conflict else ''}{number:04d}"


def selection_row(
    capability: str, pid: str, split: str, prompt: str, items: list[dict[str, Any]], salient: int, target: str
) -> dict[str, Any]:
    """The row of a selection prompt whose channel marks item `salient`."""
    return make_row(
        row_id=f"{pid}-{LETTERS[salient]}",
        prompt_id=pid,
        capability=capability,
        kind="selection",
        split=split,
        prompt=prompt,
        items=items,
        salient_item=salient,
        pole=None,
        text_pole=None,
        channel_state={capability: {"salient_item": salient, "text": items[salient]["text"]}},
        target=target,
    )


def register_row(
    capability: str, pid: str, split: str, base: dict[str, Any], pole: str, conflict: bool, state: dict[str, Any],
    target: str,
) -> dict[str, Any]:
    """The row of a register or conflict prompt whose channel holds `pole`."""
    return make_row(
        row_id=f"{pid}-{POLE_SUFFIX[pole]}",
        prompt_id=pid,
        capability=capability,
        kind="conflict" if conflict else "register",
        split=split,
        prompt=base["texts"][pole],
        items=None,
        salient_item=None,
        pole=pole,
        text_pole=flip(pole) if conflict else None,
        channel_state={capability: state},
        target=target,
    )


def flip(pole: str) -> str:
    return "-" if pole == "+" else "+"


def make_row(**fields: Any) -> dict[str, Any]:
    """A row with the contract's fields in order (`split` may be left out and set by the caller)."""
    mismatched = (set(fields) - {"split"}) ^ (set(ROW_FIELDS) - {"split"})
    if mismatched:
        raise TypeError(f"row fields do not match the contract: {sorted(mismatched)}")
    if "split" in fields and fields["split"] not in SPLITS:
        raise ValueError(f"row {fields['row_id']}: split must be one of {SPLITS}, got {fields['split']!r}")
    return {name: fields.get(name) for name in ROW_FIELDS}


def heldout_prompt_ids(prompt_ids: list[Any], heldout_fraction: float, rng: random.Random) -> set[Any]:
    """round(fraction * n) prompts held out, but at least one held out and one kept when n >= 2."""
    n = len(prompt_ids)
    if n == 0:
        return set()
    if n == 1:
        return set(prompt_ids) if heldout_fraction >= 0.5 else set()
    k = min(n - 1, max(1, round(heldout_fraction * n)))
    return set(rng.sample(prompt_ids, k))


def capability_rng(seed: int, capability: str, purpose: str) -> random.Random:
    """The random stream of one (capability, purpose): capabilities never move each other's rows."""
    return random.Random(f"tinymars/{seed}/{capability}/{purpose}")


def prompt_splits(capability: str, prompts: int, heldout_fraction: float, seed: int) -> list[str]:
    """The split of each regular prompt number of a capability, decided before any prompt is built (so the
    prompt can draw its entities from its own split's pools). A prompt later rejected by pre-flight leaves
    its split's count one short: the fraction holds approximately, exactly when nothing is rejected."""
    held = heldout_prompt_ids(list(range(prompts)), heldout_fraction, capability_rng(seed, capability, "split"))
    return ["heldout" if number in held else "train" for number in range(prompts)]


def pool_partition(pool: str, size: int, heldout_fraction: float, seed: int, at_least: int = 1) -> frozenset[int]:
    """The indices of a pool's entities that only held-out prompts may use (the rest only train prompts).

    round(fraction * size) entities, but at least `at_least` on each side (a selection prompt needs three
    distinct items of its own split). One shuffle per (seed, pool) with the held-out part taken from its
    front, so the partition does not depend on the capabilities asked for, and a larger fraction only moves
    entities from train to held out. Raises ValueError when the pool cannot feed both sides.
    """
    if size < 2 * at_least:
        raise ValueError(f"corpus/data pool '{pool}' has {size} entries; an entity-disjoint split needs at least "
                         f"{2 * at_least} ({at_least} per split); add entries to the pool")
    k = min(size - at_least, max(at_least, round(heldout_fraction * size)))
    order = list(range(size))
    random.Random(f"tinymars/{seed}/pool/{pool}").shuffle(order)
    return frozenset(order[:k])


def check_corpus_args(
    capabilities: list[str], prompts_per_capability: int, conflict_prompts_per_capability: int,
    heldout_fraction: float,
) -> None:
    unknown = [c for c in capabilities if c not in CAPABILITIES]
    if unknown or not capabilities or len(set(capabilities)) != len(capabilities):
        raise ValueError(f"capabilities must be distinct names from {CAPABILITIES}, got {capabilities}")
    if prompts_per_capability < 0 or conflict_prompts_per_capability < 0:
        raise ValueError("prompts_per_capability and conflict_prompts_per_capability must be >= 0")
    if not 0.0 <= heldout_fraction <= 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1], got {heldout_fraction}")


def corpus_stats(per_capability: dict[str, tuple[list[dict], int, int]]) -> tuple[list[dict], dict]:
    """All rows in capability order and their stats, from each capability's (rows, rejected, rejected_conflict)."""
    rows: list[dict] = []
    stats: dict[str, Any] = {"rows": 0, "by_capability": {}, "by_kind": {}, "by_split": {},
                             "rejected": {}, "rejected_conflict": {}}  # fmt: skip
    for cap, (cap_rows, rejected, rejected_conflict) in per_capability.items():
        rows += cap_rows
        stats["by_capability"][cap] = _capability_stats(cap_rows)
        stats["rejected"][cap] = rejected + rejected_conflict
        stats["rejected_conflict"][cap] = rejected_conflict
    stats["rows"] = len(rows)
    stats["by_kind"] = _count(rows, "kind")
    stats["by_split"] = _count(rows, "split")
    return rows, stats


def _count(rows: list[dict], field: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for row in rows:
        out[row[field]] = out.get(row[field], 0) + 1
    return dict(sorted(out.items()))


def _capability_stats(rows: list[dict]) -> dict[str, Any]:
    """Rows and prompts per `kind/split` (e.g. "register/train", "conflict/heldout")."""
    groups: dict[str, list[str]] = {}
    for row in rows:
        groups.setdefault(f"{row['kind']}/{row['split']}", []).append(row["prompt_id"])
    return {
        "rows": len(rows),
        "prompts": len({r["prompt_id"] for r in rows}),
        "rows_by_kind_split": {k: len(v) for k, v in sorted(groups.items())},
        "prompts_by_kind_split": {k: len(set(v)) for k, v in sorted(groups.items())},
    }
