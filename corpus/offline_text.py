"""English prose that every machine has without a network: the docstrings of Python's standard library.

What the offline rehearsal (`tinymars run --rehearse`) and the tests use as a local replay source, so the
replay stage, a production-sized vocabulary and the window mixing run for real on a laptop. The files are
parsed (`ast`), never imported (no side effects), in sorted path order: the same Python gives the same text.
"""

from __future__ import annotations

import ast
import json
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from tinymars.artifacts import write_atomic

SKIP_PARTS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "__pycache__", "turtledemo"}


def stdlib_docstrings(min_chars: int = 200) -> Iterator[str]:
    """Module, class and function docstrings of the standard library of at least `min_chars`, one per text."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        if SKIP_PARTS.intersection(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError, ValueError):
            continue
        for node in [tree, *ast.walk(tree)]:
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= min_chars:
                    yield doc


def write_prose_jsonl(path: Path, chars: int) -> dict[str, int]:
    """Write up to `chars` of stdlib docstrings as {"text": ...} lines (deduplicated); returns what was written."""
    seen: set[str] = set()
    lines: list[str] = []
    total = 0
    for doc in stdlib_docstrings():
        if doc in seen:
            continue
        seen.add(doc)
        lines.append(json.dumps({"text": doc}, ensure_ascii=False))
        total += len(doc)
        if total >= chars:
            break
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, "\n".join(lines) + "\n")
    return {"texts": len(lines), "chars": total}
