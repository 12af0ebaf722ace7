"""Turn each row's raw channel state into vectors (text channels embedded, numeric channels encoded); read them back."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from corpus.encode import encode_numeric, state_text
from tinymars.domain import TEXT_CHANNELS


class ChannelError(ValueError):
    pass


def channel_matrices(
    rows: list[dict],
    dims: dict[str, int],
    embed: Callable[[list[str]], np.ndarray],
    progress: Callable[[str], None] = lambda _: None,
) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """One `[n_rows, dim]` float32 matrix per enabled channel; a row that does not set a channel gets zeros.

    Every distinct text is embedded exactly once, however many rows share it (selection prompts
    reuse items across their three rows). Returns the matrices and counts for lineage.
    """
    out = {name: np.zeros((len(rows), dim), dtype=np.float32) for name, dim in dims.items()}
    texts: dict[str, int] = {}
    text_refs: list[tuple[str, int, str]] = []
    for i, row in enumerate(rows):
        for name, state in row["channel_state"].items():
            if name not in dims:
                continue
            if name in TEXT_CHANNELS:
                text = state_text(name, state)
                if not text.strip():
                    raise ChannelError(f"row {row['row_id']}: empty text for the {name} channel")
                texts.setdefault(text, len(texts))
                text_refs.append((name, i, text))
            else:
                try:
                    vec = np.asarray(encode_numeric(name, state, dims[name]), dtype=np.float32)
                except KeyError as exc:
                    raise ChannelError(f"row {row['row_id']}: the {name} channel state lacks field {exc}; "
                                       "see the channel_state contract in ARCHITECTURE.md") from None
                except (ValueError, TypeError) as exc:
                    raise ChannelError(f"row {row['row_id']}: bad {name} channel state: {exc}") from None
                if vec.shape != (dims[name],) or not np.isfinite(vec).all():
                    raise ChannelError(
                        f"row {row['row_id']}: the {name} channel encoded to shape {vec.shape} with "
                        f"non-finite values or wrong length; expected {dims[name]} finite numbers"
                    )
                out[name][i] = vec
    if texts:
        progress(f"embedding {len(texts)} distinct texts for {len(text_refs)} text-channel slots")
        vecs = embed(list(texts))
        if vecs.shape[0] != len(texts) or not np.isfinite(vecs).all():
            raise ChannelError(f"the embedder returned {vecs.shape} vectors (NaN/Inf or a wrong count) for "
                               f"{len(texts)} texts; check channels.embedder.model (its weights) and its device")
        for name, i, text in text_refs:
            if vecs.shape[1] != dims[name]:
                raise ChannelError(
                    f"channels.enabled.{name}.dim: {dims[name]} but the embedder gives {vecs.shape[1]}-d "
                    f"vectors; set dim: {vecs.shape[1]}"
                )
            out[name][i] = vecs[texts[text]]
    return out, {"distinct_texts": len(texts), "text_slots": len(text_refs)}


def load_channels(artifact_dir: Path) -> dict[str, Any]:
    """The channel matrices of a channels artifact as numpy arrays, in the profile's channel order."""
    from safetensors.numpy import load_file

    info = json.loads((artifact_dir / "channels.json").read_text())
    mats = load_file(str(artifact_dir / "channels.safetensors"))
    return {name: mats[name] for name in info["names"]}
