"""Packed parquet shards -> fixed-shape training and eval batches.

Rows are never concatenated (each row has its own channel state), so a batch is B rows, each
cut or padded to T = seq_len. Shapes never change between steps: that keeps torch.compile
and XLA from recompiling. The training order is a pure function of (seed, step), so a run
resumed at step s sees exactly the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from torch import Tensor

COLUMNS = ("row_id", "prompt_id", "capability", "input_ids", "loss_mask", "channels")


@dataclass
class PackedRows:
    """One split in memory: ragged token rows plus dense channels [N, C, D]."""

    row_id: list[str]
    prompt_id: list[str]
    capability: list[str]
    input_ids: list[np.ndarray]  # each int64 [L_i], L_i <= seq_len + 1
    loss_mask: list[np.ndarray]  # each int8 [L_i]
    channels: np.ndarray  # float32 [N, C, D]
    target_bytes: np.ndarray  # int64 [N]; zeros when the shards carry no target_bytes column

    def __len__(self) -> int:
        return len(self.input_ids)

    def subset(self, index: Sequence[int]) -> PackedRows:
        idx = list(index)
        return PackedRows([self.row_id[i] for i in idx], [self.prompt_id[i] for i in idx],
                          [self.capability[i] for i in idx], [self.input_ids[i] for i in idx],
                          [self.loss_mask[i] for i in idx], self.channels[idx], self.target_bytes[idx])


def _ragged(column) -> list[np.ndarray]:
    """A list<int> arrow column -> one numpy array per row, without a Python loop over values."""
    col = column.combine_chunks()
    offsets = col.offsets.to_numpy()
    values = col.values.to_numpy(zero_copy_only=False)
    return [values[offsets[i]:offsets[i + 1]] for i in range(len(col))]


def load_split(paths: Sequence[str | Path], channel_dim: int | None = None) -> PackedRows:
    """Read packed shards (in the order given) into memory.

    `channels` is stored flattened [C*D]; `channel_dim` (D) unflattens it. Left out, it is read
    from the `pack.json` the packer writes beside the shards.
    """
    if channel_dim is None and paths and (Path(paths[0]).parent / "pack.json").exists():
        channel_dim = int(json.loads((Path(paths[0]).parent / "pack.json").read_text())["channel_dim"])
    tables = [pq.read_table(str(p)) for p in paths]
    if not tables:
        raise ValueError("load_split needs at least one shard")
    missing = [c for c in COLUMNS if c not in tables[0].column_names]
    if missing:
        raise ValueError(f"shard {paths[0]} lacks columns {missing}")
    ids: list[np.ndarray] = []
    masks: list[np.ndarray] = []
    flat: list[np.ndarray] = []
    names: dict[str, list[str]] = {"row_id": [], "prompt_id": [], "capability": []}
    nbytes: list[np.ndarray] = []
    for t in tables:
        ids += [a.astype(np.int64) for a in _ragged(t.column("input_ids"))]
        masks += [a.astype(np.int8) for a in _ragged(t.column("loss_mask"))]
        flat += [a.astype(np.float32) for a in _ragged(t.column("channels"))]
        for k in names:
            names[k] += [str(x) for x in t.column(k).to_pylist()]
        tb = t.column("target_bytes").to_numpy() if "target_bytes" in t.column_names else np.zeros(t.num_rows)
        nbytes.append(np.asarray(tb, dtype=np.int64))
    widths = {len(c) for c in flat}
    if len(widths) > 1:
        raise ValueError(f"rows have different channel widths {sorted(widths)}")
    if any(len(a) != len(m) for a, m in zip(ids, masks, strict=True)):
        raise ValueError("input_ids and loss_mask lengths differ in some row")
    width = widths.pop() if widths else 0
    if width == 0:
        channels = np.zeros((len(ids), 0, channel_dim or 0), np.float32)
    elif not channel_dim or width % channel_dim:
        raise ValueError(f"cannot unflatten channels of width {width} with channel_dim={channel_dim} "
                         "(pass channel_dim or keep pack.json beside the shards)")
    else:
        channels = np.stack(flat).reshape(len(ids), width // channel_dim, channel_dim)
    return PackedRows(names["row_id"], names["prompt_id"], names["capability"], ids, masks, channels,
                      np.concatenate(nbytes) if nbytes else np.zeros(0, np.int64))


def make_batch(rows: PackedRows, index: np.ndarray, seq_len: int, pad_id: int) -> dict[str, Tensor]:
    """Rows `index` -> idx/targets/loss_mask [B,T] and channels [B,C,D].

    targets[t] = input_ids[t+1]; loss_mask[t] = the row's mask on input_ids[t+1], i.e. 1 where
    position t predicts a target token (or eos). Padding has mask 0.
    """
    B, T = len(index), seq_len
    idx = np.full((B, T), pad_id, np.int64)
    tgt = np.full((B, T), pad_id, np.int64)
    mask = np.zeros((B, T), np.float32)
    for b, r in enumerate(index):
        ids, m = rows.input_ids[r][: T + 1], rows.loss_mask[r][: T + 1]
        n = len(ids) - 1
        if n <= 0:
            continue
        idx[b, :n], tgt[b, :n], mask[b, :n] = ids[:-1], ids[1:], m[1:]
    channels = np.ascontiguousarray(rows.channels[index])
    return {"idx": torch.from_numpy(idx), "targets": torch.from_numpy(tgt),
            "loss_mask": torch.from_numpy(mask), "channels": torch.from_numpy(channels)}


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The permutation of rows for one epoch: a pure function of (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def iterate_batches(rows: PackedRows, batch_size: int, seq_len: int, pad_id: int, seed: int,
                    start_step: int = 0) -> Iterator[dict[str, Tensor]]:
    """Endless shuffled batches, always exactly batch_size rows (a batch may span two epochs).

    Sample number i = step * batch_size + j is row epoch_order(i // N)[i % N], so the stream
    can be restarted at any step without replaying the ones before it.
    """
    n = len(rows)
    if n == 0:
        raise ValueError("cannot iterate over an empty split")
    step, order, order_epoch = start_step, None, -1
    while True:
        picks = np.empty(batch_size, np.int64)
        for j in range(batch_size):
            i = step * batch_size + j
            if i // n != order_epoch:
                order_epoch = i // n
                order = epoch_order(n, seed, order_epoch)
            picks[j] = order[i % n]
        yield make_batch(rows, picks, seq_len, pad_id)
        step += 1


def eval_batches(rows: PackedRows, batch_size: int, seq_len: int, pad_id: int) -> Iterator[dict[str, Tensor]]:
    """Rows in order; the last batch may be smaller. Adds `target_bytes` [B] for bits per byte."""
    for start in range(0, len(rows), batch_size):
        index = np.arange(start, min(start + batch_size, len(rows)))
        batch = make_batch(rows, index, seq_len, pad_id)
        batch["target_bytes"] = torch.from_numpy(rows.target_bytes[index])
        yield batch
