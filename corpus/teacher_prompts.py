"""The teacher's prompt templates: plain text files in corpus/prompts/ (or a folder the profile names).

One file per request kind: `system.txt`, `memory.txt`, `identity.txt`, `continuity.txt` (selection),
`register.txt` and `conflict.txt` (affect / time / ethics), and `registers.json` naming and
describing each register pole. Templates are `str.format` text: `{field}` is filled in, a literal
brace is written `{{` or `}}`. A folder given in the profile may override any subset of the files.

The rule lines ("Mention at least one of these words: ...", "Answer content: ...", the style hint)
are what pre-flight checks, stated plainly, so a real model can follow them and the test server
can answer them deterministically.
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass
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
}


class PromptError(ValueError):
    """A template file that cannot be used; the message names the file and the fix."""


@dataclass(frozen=True)
class Templates:
    texts: dict[str, str]
    registers: dict[str, Any]

    @property
    def digest(self) -> str:
        """Content hash of every template (part of the corpus stage key)."""
        return hash_json({"texts": self.texts, "registers": self.registers})[:16]

    def messages(self, name: str, fields: dict[str, str]) -> list[dict[str, str]]:
        return [
            {"role": "system", "content": self.texts["system"].format()},
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
    return Templates(texts, registers)
