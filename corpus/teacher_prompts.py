"""The teacher's prompt templates: plain text files in corpus/prompts/ (or a folder the profile names).

One file per request kind: `system.txt`, `memory.txt`, `identity.txt`, `continuity.txt` (selection),
`register.txt` and `conflict.txt` (affect / time / ethics), and `registers.json` naming and
describing each register pole; for the scenario phase (`corpus.scenarios`) `scenario_system.txt`,
`scenario.txt` and `scenarios.json` (what each generated pool is, its fields, the batch themes).
Templates are `str.format` text: `{field}` is filled in, a literal brace is written `{{` or `}}`. A
folder given in the profile may override any subset of the files.

The rule lines ("Mention at least one of these words: ...", "Answer content: ...", the style hint)
are what pre-flight checks, stated plainly, so a real model can follow them and the test server
can answer them deterministically.
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tinymars.artifacts import hash_json
from tinymars.domain import REGISTER_CAPABILITIES

PROMPTS_DIR = Path(__file__).with_name("prompts")
SELECTION_FIELDS = {"prompt", "salient", "keys", "avoid"}
REGISTER_FIELDS = {"prompt", "question", "core", "register", "description", "opener", "closer"}
FIELDS: dict[str, set[str]] = {
    "system": set(),
    "memory": SELECTION_FIELDS,
    "identity": SELECTION_FIELDS,
    "continuity": SELECTION_FIELDS,
    "register": REGISTER_FIELDS,
    "conflict": REGISTER_FIELDS | {"text_register"},
    "scenario_system": set(),
    "scenario": {"what", "fields", "examples", "pool", "theme", "count", "batch"},
}
SCENARIO_POOL_FIELDS = {  # the pools the scenario phase can generate and the fields each entity has
    "memories": ("text", "keys", "idea", "why"),
    "threads": ("text", "keys", "topic", "step"),
    "crafts": ("role", "activity", "keys", "lens"),
    "identity_questions": ("question", "answer"),
    "neutral_prompts": ("question", "core"),
    "ethics_prompts": ("category", "question", "core"),
}


class PromptError(ValueError):
    """A template file that cannot be used; the message names the file and the fix."""


@dataclass(frozen=True)
class Templates:
    texts: dict[str, str]
    registers: dict[str, Any]
    scenarios: dict[str, Any] = field(default_factory=dict)

    @property
    def digest(self) -> str:
        """Content hash of every template (part of the corpus stage key)."""
        return hash_json({"texts": self.texts, "registers": self.registers, "scenarios": self.scenarios})[:16]

    def messages(self, name: str, fields: dict[str, str], system: str = "system") -> list[dict[str, str]]:
        return [
            {"role": "system", "content": self.texts[system].format()},
            {"role": "user", "content": self.texts[name].format(**fields)},
        ]


def _file(folder: Path | None, name: str) -> Path:
    if folder is not None and (folder / name).is_file():
        return folder / name
    return PROMPTS_DIR / name


def _check(path: Path, text: str, allowed: set[str]) -> None:
    try:
        used = {f for _, f, _, _ in string.Formatter().parse(text) if f is not None}
    except ValueError as exc:
        raise PromptError(f"{path}: not a valid template ({exc}); write a literal brace as {{{{ or }}}}") from None
    unknown = sorted(u for u in used if u not in allowed)
    if unknown:
        raise PromptError(
            f"{path}: unknown field(s) {', '.join('{' + u + '}' for u in unknown)}; allowed: "
            f"{', '.join('{' + a + '}' for a in sorted(allowed)) or 'none'} (a literal brace is {{{{ or }}}})"
        )


def load_templates(folder: str | Path | None = None) -> Templates:
    """Read and check every template (from `folder` where it has the file, else the shipped one)."""
    base = Path(folder).expanduser() if folder else None
    if base is not None and not base.is_dir():
        raise PromptError(f"corpus.teacher.prompts_dir: '{base}' is not a folder")
    texts = {}
    for name, allowed in FIELDS.items():
        path = _file(base, f"{name}.txt")
        text = path.read_text(encoding="utf-8").strip()
        _check(path, text, allowed)
        texts[name] = text
    path = _file(base, "registers.json")
    try:
        registers = json.loads(path.read_text(encoding="utf-8"))
        for cap in REGISTER_CAPABILITIES:
            for pole in ("+", "-"):
                entry = registers[cap][pole]
                if not (isinstance(entry.get("register"), str) and isinstance(entry.get("description"), str)):
                    raise KeyError(f"{cap}.{pole}")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise PromptError(
            f"{path}: needs affect/time/ethics, each with '+' and '-' holding 'register' and 'description' "
            f"strings ({exc})"
        ) from None
    return Templates(texts, registers, _scenario_descriptions(_file(base, "scenarios.json")))


def _scenario_descriptions(path: Path) -> dict[str, Any]:
    """scenarios.json: `themes` (a list of strings) and, per pool, `what` and a description of every field."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        themes = data["themes"]
        if not (isinstance(themes, list) and themes and all(isinstance(t, str) for t in themes)):
            raise KeyError("themes")
        for pool, fields in SCENARIO_POOL_FIELDS.items():
            entry = data["pools"][pool]
            if not isinstance(entry["what"], str):
                raise KeyError(f"{pool}.what")
            for name in fields:
                if not isinstance(entry["fields"][name], str):
                    raise KeyError(f"{pool}.fields.{name}")
    except (ValueError, KeyError, TypeError) as exc:
        raise PromptError(
            f"{path}: needs 'themes' (a non-empty list of strings) and 'pools' with "
            f"{', '.join(SCENARIO_POOL_FIELDS)}, each holding 'what' and 'fields' describing "
            f"{'; '.join(f'{p}: {chr(44).join(f)}' for p, f in SCENARIO_POOL_FIELDS.items())} ({exc})"
        ) from None
    return {"themes": data["themes"], "pools": {p: data["pools"][p] for p in SCENARIO_POOL_FIELDS}}
