"""Tokenize rows into parquet shards of token ids, loss masks and channel vectors.

One shard row per corpus row, each with its own channel state, stored unpadded (list<int32>).
Packing happens in the trainer's loader (models.data): it lays whole rows end to end in seq_len
windows, anew every epoch, keeping each row's channels with its tokens; the held-out split is
scored per row. So a row is never cut here beyond seq_len + 1 tokens (the most one sequence holds).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from corpus.tokenizer import HFTokenizer, Tokenizer
from tinymars.progress import ProgressCallback

SCHEMA = pa.schema(
    [
        ("row_id", pa.string()),
        ("prompt_id", pa.string()),
        ("capability", pa.string()),
        ("input_ids", pa.list_(pa.int32())),
        ("loss_mask", pa.list_(pa.int8())),
        ("channels", pa.list_(pa.float32())),
        ("target_bytes", pa.int32()),
    ]
)


PROGRESS_EVERY = 256  # rows between progress calls: a call per row would cost more than it shows


class PackError(ValueError):
    pass


def encode_row(tok: Tokenizer | HFTokenizer, prompt: str, target: str,
               seq_len: int) -> tuple[list[int], list[int], bool]:
    """`[bos] prompt <target> target [eos]` truncated to seq_len+1 tokens; the mask marks target + eos.

    The prompt is kept whole when it can be (the target is cut first): a row whose prompt alone
    does not fit is an error, since training on it would teach the model to answer a cut prompt.
    """
    prompt_ids = tok.prompt_ids(prompt)
    target_ids = [*tok.encode(target), tok.eos_id]
    if len(prompt_ids) >= seq_len:
        raise PackError(
            f"pack.seq_len: {seq_len} is too short for a prompt of {len(prompt_ids)} tokens; raise pack.seq_len"
        )
    ids = (prompt_ids + target_ids)[: seq_len + 1]
    mask = ([0] * len(prompt_ids) + [1] * len(target_ids))[: seq_len + 1]
    return ids, mask, len(prompt_ids) + len(target_ids) > seq_len + 1


def pack_rows(
    rows: list[dict[str, Any]],
    channels: dict[str, np.ndarray],
    tok: Tokenizer | HFTokenizer,
    seq_len: int,
    rows_per_shard: int,
    out_dir: Path,
    progress: ProgressCallback | None = None,
) -> dict[str, Any]:
    """Write `{train,heldout}-NNNNN.parquet` and `pack.json`; conflict rows are eval-only and not packed.

    `progress(done, len(rows))` follows the rows tokenised (every PROGRESS_EVERY rows and at the end)."""
    names = list(channels)
    dim = max(m.shape[1] for m in channels.values())
    flat = np.zeros((len(rows), len(names), dim), dtype=np.float32)
    for c, name in enumerate(names):
        if channels[name].shape[0] != len(rows):
            raise PackError(f"channels '{name}': {channels[name].shape[0]} vectors for {len(rows)} corpus rows; the "
                            "channels artifact was built from another corpus: rerun with --refresh channels")
        flat[:, c, : channels[name].shape[1]] = channels[name]
    bad = np.flatnonzero(~np.isfinite(flat).all(axis=(1, 2)))
    if bad.size:
        raise PackError(f"channels: NaN/Inf channel vectors in rows {[rows[i]['row_id'] for i in bad[:3]]}; rebuild "
                        "the channels stage (--refresh channels) and check channels.embedder.model")
    flat = flat.reshape(len(rows), -1)

    per_split: dict[str, list[dict[str, Any]]] = {"train": [], "heldout": []}
    truncated = 0
    for i, row in enumerate(rows):
        if progress is not None and i % PROGRESS_EVERY == 0:
            progress(i, len(rows))
        if row["kind"] == "conflict":
            continue
        ids, mask, cut = encode_row(tok, row["prompt"], row["target"], seq_len)
        truncated += cut
        # bits per byte divides by the bytes of the target the model is scored on: all of it, unless cut
        kept = tok.decode([t for t, m in zip(ids, mask, strict=True) if m]) if cut else row["target"]
        per_split[row["split"]].append(
            {
                "row_id": row["row_id"],
                "prompt_id": row["prompt_id"],
                "capability": row["capability"],
                "input_ids": ids,
                "loss_mask": mask,
                "channels": flat[i].tolist(),
                "target_bytes": len(kept.encode("utf-8")),
            }
        )
    if progress is not None:
        progress(len(rows), len(rows))
    if not per_split["train"]:
        raise PackError("pack: the corpus has no train rows; raise corpus.prompts_per_capability")
    if not per_split["heldout"]:
        raise PackError("pack: the corpus has no held-out rows; raise corpus.heldout_fraction")

    shards: dict[str, list[str]] = {}
    for split, items in per_split.items():
        shards[split] = []
        for n, start in enumerate(range(0, len(items), rows_per_shard)):
            name = f"{split}-{n:05d}.parquet"
            table = pa.Table.from_pylist(items[start : start + rows_per_shard], schema=SCHEMA)
            pq.write_table(table, out_dir / name, compression="zstd")
            shards[split].append(name)
    meta = {
        "seq_len": seq_len,
        "channel_names": names,
        "channel_dim": dim,
        "channel_dims": [int(channels[n].shape[1]) for n in names],  # each channel's own width (per-channel encoders)
        "vocab_size": tok.vocab_size,
        "pad_id": tok.pad_id,
        "bos_id": tok.bos_id,
        "eos_id": tok.eos_id,
        "target_ids": list(tok.target_ids),  # the separator: one <target> piece, or a base tokenizer's text
        "tokenizer_kind": tok.kind,
        "rows": {s: len(v) for s, v in per_split.items()},
        "tokens": {s: int(sum(len(r["input_ids"]) for r in v)) for s, v in per_split.items()},
        "truncated_rows": truncated,
        "shards": shards,
    }
    (out_dir / "pack.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
    return meta
