"""Generate / score artifact files: generations read back and checked (offline re-scoring), JSON in report order."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CROSSTALK = "crosstalk.jsonl"  # the crosstalk generations beside generations.jsonl (models.crosstalk, eval.crosstalk)
REQUIRED = ("row_id", "prompt_id", "capability", "kind", "arm", "response")
REQUIRED_BY_KIND = {"selection": ("items", "salient_item"), "register": ("pole",), "conflict": ("pole",)}


class GenerationsError(ValueError):
    """A generations file that cannot be scored; the message names the line and the field."""


def read_generations(path: str | Path) -> list[dict[str, Any]]:
    """Records of a generations.jsonl, validated; blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise GenerationsError(f"{path}: no such file; pass the generate artifact's generations.jsonl")
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise GenerationsError(f"{path} line {lineno}: not JSON ({exc.msg})") from None
            if not isinstance(rec, dict):
                raise GenerationsError(f"{path} line {lineno}: expected a JSON object")
            kind = rec.get("kind")
            for field in (*REQUIRED, *REQUIRED_BY_KIND.get(kind, ())):
                if rec.get(field) is None:
                    raise GenerationsError(f"{path} line {lineno}: missing field '{field}'")
            if kind not in REQUIRED_BY_KIND:
                raise GenerationsError(f"{path} line {lineno}: kind '{kind}' is not one of {sorted(REQUIRED_BY_KIND)}")
            records.append(rec)
    if not records:
        raise GenerationsError(f"{path}: holds no generation records")
    return records


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False, sort_keys=True) + "\n")


def write_json(path: Path, obj: Any) -> None:
    """Strict JSON (no NaN) in the object's own key order: the scorers build their dicts in report order
    (capabilities canonical, arms mars / ablated / text), and a re-read report must keep that order."""
    path.write_text(json.dumps(obj, indent=1, allow_nan=False) + "\n", encoding="utf-8")
