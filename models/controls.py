"""Training-time channel controls: cut the channel's information while keeping everything else.

The negative control of the science in CI (`tests/test_controls.py`, `train.channel_control: permuted`)
trains on the same rows, tokens and channel *distribution* as the real run, but with each row's channel
vectors moved to another row, so the channel says nothing about that row's target. A model trained so
must show no channel effect at evaluation (MARS, with the real channel, no better than ABLATED): if it
does, the verdicts measure something other than the channel. Only the train split is permuted; the
held-out split (losses) and the eval stage (which reads the channels artifact) keep the real vectors.
"""

from __future__ import annotations

import dataclasses
from typing import TypeVar

import numpy as np

from tinymars.profile import TrainRecipe

Rows = TypeVar("Rows")  # models.data.PackedRows, or any dataclass whose `channels` has one entry per row


def derangement(n: int, seed: int) -> np.ndarray:
    """A seeded permutation of range(n) with no fixed point (for n >= 2; n < 2 has none to offer).

    The rows are shuffled and each takes the next one's place in that order (one n-cycle), so no
    row keeps its own index whatever the seed.
    """
    order = np.random.default_rng([seed, 0x5EED]).permutation(n)
    perm = np.arange(n)
    if n >= 2:
        perm[order] = np.roll(order, -1)
    return perm


def permute_channels(rows: Rows, seed: int) -> Rows:
    """`rows` with their channel vectors permuted across rows (a seeded derangement); tokens untouched."""
    channels = rows.channels
    return dataclasses.replace(rows, channels=channels[derangement(len(channels), seed)])


def apply_channel_control(rows: Rows, recipe: TrainRecipe) -> Rows:
    """The train split as the recipe's `channel_control` asks: `real` as is, `permuted` seeded by the recipe."""
    if recipe.channel_control == "real":
        return rows
    if recipe.channel_control == "permuted":
        return permute_channels(rows, recipe.seed)
    raise ValueError(f"train.channel_control: unknown control {recipe.channel_control!r}; allowed: real, permuted")
