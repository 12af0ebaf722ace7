"""Subcommands beyond the core ones in tinymars/cli.py, one module each, discovered automatically.

A module here defines `register(sub: argparse._SubParsersAction) -> None`, which adds its parser
and sets `handler=<function(args) -> int>` with `set_defaults`.
"""

from __future__ import annotations

import importlib
import pkgutil


def register_all(sub) -> None:
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        importlib.import_module(f"{__name__}.{info.name}").register(sub)
