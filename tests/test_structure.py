"""The layer contract of ARCHITECTURE.md, enforced: imports only point down, domain code never imports Prefect.

Every import is checked, including the ones inside functions (a lazy import is still an arrow).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# package -> the project packages it may import (besides itself); ARCHITECTURE.md "Packages" says the same.
LAYERS: dict[str, frozenset[str]] = {
    "app": frozenset({"deploy", "flows", "tasks", "models", "corpus", "scorers", "tinymars"}),
    "bench": frozenset({"deploy", "flows", "tasks", "models", "corpus", "scorers", "tinymars", "tests"}),
    "deploy": frozenset({"flows", "tinymars"}),
    "flows": frozenset({"tasks", "tinymars"}),
    "tasks": frozenset({"models", "corpus", "scorers", "tinymars"}),
    "models": frozenset({"corpus", "tinymars"}),
    "corpus": frozenset({"scorers", "tinymars"}),
    "scorers": frozenset({"tinymars"}),
    "tinymars": frozenset(),
}
PROJECT = frozenset(LAYERS) | {"tests"}
# third-party packages a layer must never import
FORBIDDEN = {
    "tinymars": {"prefect", "torch"},
    "corpus": {"prefect", "torch"},
    "models": {"prefect"},
    "scorers": {"prefect", "torch"},
}


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, dotted module) of every import in a file, at any depth (function bodies included)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module))
        elif isinstance(node, ast.ImportFrom) and node.level > 0:  # relative: resolve against the file's package
            pkg = path.relative_to(ROOT).parts[0]
            out.append((node.lineno, f"{pkg}.{node.module or ''}"))
    return out


def violations(root: Path = ROOT, layers: dict[str, frozenset[str]] = LAYERS) -> list[str]:
    """Every import that points up (or sideways) across the layers, or reaches a forbidden library."""
    found = []
    for package, allowed in layers.items():
        for path in sorted((root / package).rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            for line, module in imported_modules(path):
                top = module.split(".")[0]
                where = f"{path.relative_to(root)}:{line}"
                if top in PROJECT and top != package and top not in allowed:
                    rule = f"only {', '.join(sorted(allowed))}" if allowed else "no other package of ours"
                    found.append(f"{where} imports {module}: {package}/ may import {rule}")
                if top in FORBIDDEN.get(package, ()):
                    found.append(f"{where} imports {module}: {package}/ must not import {top}")
    return found


def test_imports_only_point_down() -> None:
    assert violations() == []


def test_every_package_has_a_layer() -> None:
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")} | {"bench"}
    assert packages - {"tests"} == set(LAYERS), "a new top-level package needs a row in LAYERS and ARCHITECTURE.md"


def test_the_architecture_table_lists_the_same_layers() -> None:
    text = (ROOT / "ARCHITECTURE.md").read_text(encoding="utf-8")
    for package in LAYERS:
        assert f"| `{package}/` |" in text, f"ARCHITECTURE.md has no row for {package}/"


@pytest.mark.parametrize("planted, expected", [
    ("from flows.iteration import iteration\n", "tinymars/profile.py:1 imports flows.iteration"),
    ("def f():\n    import app.cli\n", "tinymars/profile.py:2 imports app.cli"),  # a lazy import is an arrow too
    ("import prefect\n", "tinymars/profile.py:1 imports prefect: tinymars/ must not import prefect"),
])
def test_a_planted_upward_import_is_caught(tmp_path: Path, planted: str, expected: str) -> None:
    (tmp_path / "tinymars").mkdir()
    (tmp_path / "tinymars" / "profile.py").write_text(planted)
    (tmp_path / "flows").mkdir()
    (tmp_path / "flows" / "iteration.py").write_text("from tinymars.profile import load_profile\n")
    found = violations(tmp_path, {"tinymars": frozenset(), "flows": frozenset({"tinymars"})})
    assert len(found) == 1 and found[0].startswith(expected), found
