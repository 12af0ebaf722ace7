"""Sweep grids: which profile values vary, the points of their product, and which points must wait for which.

One place for the grid, shared by `tinymars sweep` (pre-flight of every point before any work) and the
`sweep` flow (a deployment receives the same `vary` data). A point is a list of `--set`-style overrides
applied to the base profile, so a point's profile is exactly what `tinymars run --set ...` would run.

Sharing: a stage's cache key depends on profile sections, and a section first reaches one stage and,
through content hashes, everything downstream of it (SECTION_FIRST_STAGE, tinymars.stages.PARENTS). Two
points build the same artifact of a stage exactly when they agree on every varied key that reaches it;
`waits_for` makes a point wait for the earliest point that builds a stage they share, so concurrent points
never build one artifact twice.
"""

from __future__ import annotations

import itertools
import re
import types
from typing import Any, Union, get_args, get_origin

import yaml
from pydantic import BaseModel

from tinymars.artifacts import canonical_json
from tinymars.stages import ORDER, PARENTS

# The first stage whose key a profile section reaches (the stage's descendants follow by content hash).
# Conservative where a section is read by several stages: the earliest of them.
SECTION_FIRST_STAGE: dict[str, str] = {
    "corpus": "corpus", "channels": "channels", "tokenizer": "tokenizer", "replay": "tokenizer",
    "pack": "pack", "train": "train", "steering": "steer", "eval": "steer", "report": "report",
    "description": "report",
}
NOT_VARIABLE = ("name", "sweep")
MAX_VARIED_KEYS = 8


class SweepError(ValueError):
    """A bad sweep grid; the message names the key and the fix."""


def parse_vary(items: list[str]) -> dict[str, list[Any]]:
    """`--vary KEY=V1,V2,...` options (values in YAML syntax, as --set) as {key: [values]}."""
    vary: dict[str, list[Any]] = {}
    for item in items:
        if "=" not in item:
            raise SweepError(f"--vary '{item}': expected KEY=V1,V2,..., e.g. train.lr=1e-3,3e-3")
        key, raw = (s.strip() for s in item.split("=", 1))
        if key in vary:
            raise SweepError(f"--vary '{item}': {key} is varied twice; give all its values in one --vary")
        try:
            values = yaml.safe_load(f"[{raw}]")
        except yaml.YAMLError as exc:
            raise SweepError(f"--vary '{item}': values are not valid YAML: {exc}") from None
        vary[key] = [_number(v) for v in values]
    return vary


def _number(value: Any) -> Any:
    """1e-3 as a float: YAML 1.1 reads an exponent without a dot as a string (a label would show it quoted)."""
    if isinstance(value, str) and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+", value):
        return float(value)
    return value


def key_problem(dotted: str) -> str | None:
    """Why `dotted` names no field of the profile schema (walking nested sections), or None."""
    from tinymars.profile import Profile

    parts = dotted.split(".")
    if not all(parts):
        return f"empty name in '{dotted}'; expected SECTION.KEY, e.g. train.lr"
    if parts[0] in NOT_VARIABLE:
        return f"'{parts[0]}' cannot be varied; vary a section's key such as train.lr"
    models: list[type[BaseModel]] = [Profile]
    for depth, part in enumerate(parts):
        fields = {name: f for m in models for name, f in m.model_fields.items()}
        if part not in fields:
            where = ".".join(parts[:depth]) or "the profile"
            return f"'{part}' is not a key of {where}; allowed: {', '.join(sorted(fields))}"
        models = _section_models(fields[part].annotation)
        if depth < len(parts) - 1 and not models:
            return f"'{'.'.join(parts[:depth + 1])}' is a value, not a section; vary it as a whole"
    return None


def _section_models(annotation: Any) -> list[type[BaseModel]]:
    """The profile sections a field holds (through Optional / unions / Annotated), [] for a plain value."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    if get_origin(annotation) in (Union, types.UnionType) or str(get_origin(annotation)) == "typing.Annotated":
        return [m for arg in get_args(annotation) for m in _section_models(arg)]
    return []


def check_vary(vary: Any) -> dict[str, list[Any]]:
    """The grid's shape: a non-empty mapping of schema keys to non-empty lists of distinct values."""
    if not isinstance(vary, dict) or not vary:
        raise SweepError("sweep: the grid is empty; give --vary KEY=V1,V2 (or a profile `sweep: {vary: "
                         "{train.lr: [1e-3, 3e-3]}}`)")
    if len(vary) > MAX_VARIED_KEYS:
        raise SweepError(f"sweep: {len(vary)} varied keys; at most {MAX_VARIED_KEYS} (split the sweep)")
    for key, values in vary.items():
        if problem := key_problem(str(key)):
            raise SweepError(f"sweep.vary.{key}: {problem}")
        if not isinstance(values, list) or not values:
            raise SweepError(f"sweep.vary.{key}: needs a list of at least one value, e.g. [1e-3, 3e-3]")
        seen = [canonical_json(v) for v in values]
        if len(set(seen)) != len(seen):
            raise SweepError(f"sweep.vary.{key}: lists a value twice ({values}); give distinct values")
    return vary


def yaml_value(value: Any) -> str:
    """A value as `--set` text that YAML reads back as the same value (1e-05 stays a float)."""
    return yaml.safe_dump(value, default_flow_style=True, width=1 << 30).removesuffix("\n...\n").strip()


def grid_points(vary: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """The product of the varied values, the last key varying fastest."""
    check_vary(vary)
    keys = list(vary)
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(vary[k] for k in keys))]


def point_overrides(point: dict[str, Any]) -> list[str]:
    return [f"{k}={yaml_value(v)}" for k, v in point.items()]


def point_label(point: dict[str, Any]) -> str:
    return ", ".join(point_overrides(point))


def reached_stages(key: str) -> set[str]:
    """The stages whose key a varied profile key can change: its section's first stage and downstream."""
    first = SECTION_FIRST_STAGE.get(key.split(".")[0])
    if first is None:  # orchestration: in no key
        return set()
    reached = {first}
    for stage in ORDER:
        if reached.intersection(PARENTS[stage]):
            reached.add(stage)
    return reached


def _signature(point: dict[str, Any], stage: str) -> str:
    return canonical_json({k: v for k, v in point.items() if stage in reached_stages(k)})


def shared_stages(points: list[dict[str, Any]]) -> list[str]:
    """The stages (in order) every point builds identically: built once, whatever runs first."""
    return [s for s in ORDER if len({_signature(p, s) for p in points}) == 1]


def waits_for(points: list[dict[str, Any]], skip: set[str] = frozenset()) -> list[set[int]]:
    """For each point, the earlier points it must wait for: for every stage it shares with an earlier point
    (stages in `skip` are already built), the earliest such point builds it, and the others reuse it."""
    out = []
    for j, point in enumerate(points):
        deps = set()
        for stage in ORDER:
            if stage in skip:
                continue
            sig = _signature(point, stage)
            first = next(i for i, p in enumerate(points) if _signature(p, stage) == sig)
            if first < j:
                deps.add(first)
        out.append(deps)
    return out
