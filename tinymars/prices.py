"""Teacher prices: the shipped table (tinymars/data/prices.json), a profile override, and call costs.

A paid model with no known price is an error before any call is made: a cost audit that silently
counts $0 for an unpriced model is worse than none. A local server (the profile marks it `free`)
costs nothing. Reasoning tokens are already inside `completion_tokens`, so they are never billed twice.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

PRICES_PATH = Path(__file__).with_name("data") / "prices.json"
PER_TOKENS = 1_000_000  # table rates are USD per 1M tokens
_SNAPSHOT = re.compile(r"-\d{4}-\d{2}-\d{2}$")


class PriceError(ValueError):
    """No price for a paid model; the message names the fix."""


@dataclass(frozen=True)
class Price:
    """USD per 1M tokens."""

    input: float
    cached_input: float
    output: float
    batch_input: float
    batch_output: float

    def cost(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0, batch: bool = False) -> float:
        """What one answered call costs: uncached prompt + cached prompt + completion (reasoning included)."""
        cached = min(max(cached_tokens, 0), max(prompt_tokens, 0))
        uncached = max(prompt_tokens, 0) - cached
        if batch:
            # the batch discount applies to the cached rate too
            ratio = self.batch_input / self.input if self.input else 1.0
            usd = uncached * self.batch_input + cached * self.cached_input * ratio
            usd += max(completion_tokens, 0) * self.batch_output
        else:
            usd = uncached * self.input + cached * self.cached_input + max(completion_tokens, 0) * self.output
        return usd / PER_TOKENS

    def worst_case(self, prompt_tokens: int, max_tokens: int, batch: bool = False) -> float:
        """The most one call can cost: every prompt token uncached and the full `max_tokens` generated."""
        return self.cost(prompt_tokens, max_tokens, 0, batch)

    @property
    def free(self) -> bool:
        return not any((self.input, self.cached_input, self.output, self.batch_input, self.batch_output))


FREE = Price(0.0, 0.0, 0.0, 0.0, 0.0)


@cache
def price_table() -> dict[str, Price]:
    """The shipped table, model name -> Price."""
    data = json.loads(PRICES_PATH.read_text(encoding="utf-8"))
    return {name: Price(**row) for name, row in data["models"].items()}


def price_from_override(row: dict[str, Any]) -> Price:
    """A profile's `corpus.teacher.price` (input/output required; cached and batch rates default to them)."""
    return Price(
        input=float(row["input"]),
        cached_input=float(row.get("cached_input") if row.get("cached_input") is not None else row["input"]),
        output=float(row["output"]),
        batch_input=float(row.get("batch_input") if row.get("batch_input") is not None else row["input"]),
        batch_output=float(row.get("batch_output") if row.get("batch_output") is not None else row["output"]),
    )


def lookup(model: str) -> Price | None:
    """The table's row for a model, or for its base name when `model` is a dated snapshot."""
    table = price_table()
    return table.get(model) or table.get(_SNAPSHOT.sub("", model))


def resolve_price(model: str, override: dict[str, Any] | None = None, free: bool = False) -> Price:
    """The price the cost audit and the budget use: free endpoint, else the override, else the table."""
    if free:
        return FREE
    if override is not None:
        return price_from_override(override)
    price = lookup(model)
    if price is None:
        raise PriceError(
            f"corpus.teacher.model: no price for '{model}' in tinymars/data/prices.json; add "
            "corpus.teacher.price {input: ..., output: ...} (USD per 1M tokens), or set corpus.teacher.free: true "
            "for a local server"
        )
    return price
