"""Packed parquet shards -> fixed-shape training and eval batches, sharded across DDP ranks.

Rows are never concatenated (each row has its own channel state), so a batch is B rows, each
cut or padded to T = seq_len. Shapes never change between steps: that keeps torch.compile
and XLA from recompiling. The training order is a pure function of (seed, step), so a run
resumed at step s sees exactly the batches the uninterrupted run would have seen, and every
rank derives the same global batch and takes its own slice of it (no sampler state to save).

Shards are memory-mapped and token rows are zero-copy views of the Arrow buffers, so DDP ranks
on one host share the page cache instead of each holding a copy; channels are one dense array.
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
    input_ids: list[np.ndarray]  # each int [L_i] (int32 from the packer), L_i <= seq_len + 1
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
    tables = [pq.read_table(str(p), memory_map=True) for p in paths]
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
        ids += _ragged(t.column("input_ids"))  # views, not copies; make_batch widens them
        masks += _ragged(t.column("loss_mask"))
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


def batch_rows(n: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """Row indices of global batch `step` (0-based): sample i = step * B + j is epoch_order(i // n)[i % n].

    A batch may span two epochs; any step can be computed without replaying the ones before it.
    """
    if n == 0:
        raise ValueError("cannot draw batches from an empty split")
    samples = step * batch_size + np.arange(batch_size)
    picks = np.empty(batch_size, np.int64)
    for epoch in np.unique(samples // n):
        here = samples // n == epoch
        picks[here] = epoch_order(n, seed, int(epoch))[samples[here] % n]
    return picks


def shard_rows(picks: np.ndarray, grad_accum: int, world: int, rank: int, micro: int) -> np.ndarray:
    """This rank's rows for micro-step `micro` of a global batch laid out as [grad_accum, world, B_micro]."""
    if len(picks) % (grad_accum * world):
        raise ValueError(f"batch_size {len(picks)} is not divisible by grad_accum x devices = {grad_accum} x {world}")
    return picks.reshape(grad_accum, world, -1)[micro, rank]


def loss_token_counts(rows: PackedRows, seq_len: int) -> np.ndarray:
    """Per row, the number of positions a batch will train on (mask of input_ids[1 : seq_len + 1])."""
    return np.array([int(m[1:seq_len + 1].sum()) for m in rows.loss_mask], dtype=np.int64)


def iterate_batches(rows: PackedRows, batch_size: int, seq_len: int, pad_id: int, seed: int,
                    start_step: int = 0) -> Iterator[dict[str, Tensor]]:
    """Endless shuffled global batches of exactly batch_size rows, from `start_step` on (see batch_rows)."""
    step = start_step
    while True:
        yield make_batch(rows, batch_rows(len(rows), batch_size, seed, step), seq_len, pad_id)
        step += 1


def pad_batch(batch: dict[str, Tensor], size: int, pad_id: int) -> dict[str, Tensor]:
    """Append empty rows (pad tokens, mask 0, zero channels) up to `size` rows: one shape for every batch."""
    extra = size - batch["idx"].size(0)
    if extra <= 0:
        return batch
    out = {}
    for k, v in batch.items():
        filler = torch.full((extra, *v.shape[1:]), pad_id if k in ("idx", "targets") else 0, dtype=v.dtype)
        out[k] = torch.cat([v, filler])
    return out


def eval_batches(rows: PackedRows, batch_size: int, seq_len: int, pad_id: int,
                 fixed_shape: bool = False) -> Iterator[dict[str, Tensor]]:
    """Rows in order, with `target_bytes` [B] for bits per byte.

    The last batch may be smaller, unless `fixed_shape` (XLA): then it is padded with empty rows
    that carry no loss and no bytes, so evaluation compiles one graph.
    """
    for start in range(0, len(rows), batch_size):
        index = np.arange(start, min(start + batch_size, len(rows)))
        batch = make_batch(rows, index, seq_len, pad_id)
        batch["target_bytes"] = torch.from_numpy(rows.target_bytes[index])
        yield pad_batch(batch, batch_size, pad_id) if fixed_shape else batch
