"""Subcommands beyond the core ones in app/cli.py, one module each, discovered automatically.

A module here defines `add_parser(sub: argparse._SubParsersAction) -> None`, which adds its parser
and sets `handler=<function(args) -> int>` with `set_defaults`.
"""

from __future__ import annotations

import importlib
import pkgutil


def add_all(sub) -> None:
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        importlib.import_module(f"{__name__}.{info.name}").add_parser(sub)
