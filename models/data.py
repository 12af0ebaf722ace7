"""Packed parquet shards -> fixed-shape training and eval batches, sharded across DDP ranks.

A sequence of T = seq_len positions is either one row, padded (`make_batch`), or a *window*: whole
rows laid end to end until the next one would not fit (`make_window_batch`). A row of L tokens
fills L - 1 positions (inputs ids[:-1], targets ids[1:]), so a row never predicts the next row's
first token and is never cut. A window carries, per position, the slot of its row (`row_ids`,
-1 on the tail padding) and its position inside the row (`positions`, restarting at 0), per row
slot the row's channel vectors ([B, R, C, D]), and per tile of TILE positions the row slots the
tile touches (`row_tiles` [B, nT, Rb]): the model keeps attention inside a row and reads each
position's own row's channels (models.gpt.Window). R and Rb are fixed for a split
(`window_slots`, `tile_slots`), so shapes never change between steps: torch.compile and XLA
compile once.

Packing happens here, per epoch, not in the pack stage: the pack artifact stays one row per corpus
row (held-out losses, bits per byte, the eval and a channel control all work per row), and every
epoch packs the rows anew, so rows meet different neighbours. Epoch e shuffles the rows
(`epoch_order`), fills windows best fit (`pack_windows`: each window takes the longest row of a
look-ahead buffer that still fits, as nanochat's loader does for documents, but never crops one),
then shuffles the windows, so long and short rows are not served in order. All of it is a pure
function of (rows, seq_len, seed): a run resumed at step s sees exactly the windows the
uninterrupted run would have seen, and every rank derives the same global batch and takes its own
slice of it (no sampler state to save). `batch_size` counts sequences: windows when packed, rows
otherwise.

Shards are memory-mapped and token rows are zero-copy views of the Arrow buffers, so DDP ranks
on one host share the page cache instead of each holding a copy; channels are one dense array.
"""

from __future__ import annotations

import bisect
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from torch import Tensor

COLUMNS = ("row_id", "prompt_id", "capability", "input_ids", "loss_mask", "channels")
LOOKAHEAD = 2048  # rows the best-fit packer chooses among; more fills windows better but costs O(buffer) per row
PAD_ROW = -1  # row_ids of a window's tail padding (and row_tiles entries that name no row)
TILE = 64  # most positions per tile of the channel injection (models.gpt.ChannelInjection._per_row)


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


def sample_rows(rows: PackedRows, most: int | None, seed: int) -> PackedRows:
    """At most `most` rows, a seeded sample kept in split order (None or enough rows: all of them)."""
    if most is None or len(rows) <= most:
        return rows
    return rows.subset(np.sort(np.random.default_rng([seed, 3]).choice(len(rows), most, replace=False)))


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


# ---- one row per sequence (padded) -------------------------------------------------------------
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


def row_positions(rows: PackedRows, seq_len: int) -> np.ndarray:
    """Per row, the positions it fills in a sequence (its real tokens): min(L, seq_len + 1) - 1, at least 0."""
    return np.array([max(0, min(len(a), seq_len + 1) - 1) for a in rows.input_ids], dtype=np.int64)


def iterate_batches(rows: PackedRows, batch_size: int, seq_len: int, pad_id: int, seed: int,
                    start_step: int = 0) -> Iterator[dict[str, Tensor]]:
    """Endless shuffled global batches of exactly batch_size rows, from `start_step` on (see batch_rows)."""
    step = start_step
    while True:
        yield make_batch(rows, batch_rows(len(rows), batch_size, seed, step), seq_len, pad_id)
        step += 1


# ---- whole rows packed into windows ------------------------------------------------------------
def pack_windows(lengths: np.ndarray, order: Sequence[int] | np.ndarray, seq_len: int,
                 lookahead: int = LOOKAHEAD) -> list[np.ndarray]:
    """Rows (taken in `order`) -> windows: arrays of row indices whose lengths sum to at most seq_len.

    Best fit over a look-ahead buffer: a window takes the longest buffered row that still fits (the
    earliest of equal ones), refilling the buffer from `order`, until none fits; then the next window
    starts. No row is cut and every row of positive length lands in exactly one window; rows of
    length 0 (nothing to predict) are left out. Deterministic: the same inputs give the same windows.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size and int(lengths.max()) > seq_len:
        raise ValueError(f"a row fills {int(lengths.max())} positions, more than seq_len {seq_len}; "
                         "rows are cut to seq_len + 1 tokens (row_positions) before packing")
    queue = [int(r) for r in order if lengths[r] > 0]
    buffer: list[tuple[int, int]] = []  # (length, place in queue), sorted
    taken = 0

    def refill() -> None:
        nonlocal taken
        while len(buffer) < lookahead and taken < len(queue):
            bisect.insort(buffer, (int(lengths[queue[taken]]), taken))
            taken += 1

    refill()
    windows: list[np.ndarray] = []
    while buffer:
        room, window = seq_len, []
        while room > 0:
            fits = bisect.bisect_right(buffer, (room, len(queue))) - 1
            if fits < 0:
                break
            at = bisect.bisect_left(buffer, (buffer[fits][0], -1))  # the earliest row of that length
            length, place = buffer.pop(at)
            window.append(queue[place])
            room -= length
            refill()
        windows.append(np.array(window, dtype=np.int64))
    return windows


def window_slots(lengths: np.ndarray, seq_len: int) -> int:
    """R, the row slots of every window of a split: the most rows a window can hold (seq_len // shortest row).

    One fixed number per split keeps the channels tensor [B, R, C, D] one shape for every batch.
    """
    positive = np.asarray(lengths)[np.asarray(lengths) > 0]
    if positive.size == 0:
        raise ValueError("no row has a token to predict (every row is a single token); check the pack stage")
    return int(min(seq_len // int(positive.min()), positive.size))


def tiling(seq_len: int) -> tuple[int, int]:
    """(nT, S): a window's positions cut into nT = ceil(T / TILE) tiles of S = ceil(T / nT) <= TILE positions
    (the last may be shorter). The model recovers S from nT the same way."""
    n = -(-seq_len // TILE)
    return n, -(-seq_len // n)


def tile_slots(lengths: np.ndarray, seq_len: int) -> int:
    """Rb, the most rows one tile can touch: its first and last rows may show one position each, every
    row between fills at least the shortest row's length."""
    positive = np.asarray(lengths)[np.asarray(lengths) > 0]
    if positive.size == 0:
        raise ValueError("no row has a token to predict (every row is a single token); check the pack stage")
    span = tiling(seq_len)[1]
    return int(min(window_slots(lengths, seq_len), 1 if span == 1 else 2 + (span - 2) // int(positive.min())))


def packing_efficiency(lengths: np.ndarray, windows: Sequence[np.ndarray], seq_len: int) -> float:
    """Real positions / all positions of the windows (1.0: no padding at all)."""
    used = sum(int(np.asarray(lengths)[w].sum()) for w in windows)
    return used / max(1, len(windows) * seq_len)


def make_window_batch(rows: PackedRows, windows: Sequence[np.ndarray], seq_len: int, pad_id: int,
                      slots: int, tiles: int) -> dict[str, Tensor]:
    """Windows (each an array of row indices) -> idx/targets/loss_mask/row_ids/positions [B,T], channels
    [B,R,C,D] (R = slots; empty slots are zeros), row_tiles [B,nT,Rb] (Rb = tiles) and target_bytes [B]
    (the window's rows' target bytes).

    Within a window, row j fills the next L_j - 1 positions with its inputs/targets/mask exactly as
    `make_batch` lays out a row alone; row_ids is its slot j there (PAD_ROW on the tail padding) and
    positions count 0, 1, ... from its first token. Tile i (positions i*S ..., `tiling`) lists the
    slots from its first position's row on, PAD_ROW past the window's last row.
    """
    B, T = len(windows), seq_len
    _, C, D = rows.channels.shape
    idx = np.full((B, T), pad_id, np.int64)
    tgt = np.full((B, T), pad_id, np.int64)
    mask = np.zeros((B, T), np.float32)
    row_ids = np.full((B, T), PAD_ROW, np.int64)
    positions = np.zeros((B, T), np.int64)
    channels = np.zeros((B, slots, C, D), np.float32)
    nbytes = np.zeros(B, np.int64)
    for b, window in enumerate(windows):
        if len(window) > slots:
            raise ValueError(f"a window holds {len(window)} rows but the batch has {slots} row slots")
        at = 0
        for slot, r in enumerate(window):
            ids, m = rows.input_ids[r][: T + 1], rows.loss_mask[r][: T + 1]
            n = len(ids) - 1
            if at + n > T:
                raise ValueError(f"window {b} overflows seq_len {T}; windows come from pack_windows")
            idx[b, at:at + n], tgt[b, at:at + n], mask[b, at:at + n] = ids[:-1], ids[1:], m[1:]
            row_ids[b, at:at + n] = slot
            positions[b, at:at + n] = np.arange(n)
            at += n
        channels[b, :len(window)] = rows.channels[window]
        nbytes[b] = rows.target_bytes[window].sum()
    n_tiles, span = tiling(T)
    first = row_ids[:, np.arange(n_tiles) * span]  # the row of each tile's first position
    row_tiles = first[:, :, None] + np.arange(tiles)
    n_rows = np.array([len(w) for w in windows])[:, None, None]
    row_tiles[(first[:, :, None] < 0) | (row_tiles >= n_rows)] = PAD_ROW
    return {"idx": torch.from_numpy(idx), "targets": torch.from_numpy(tgt), "loss_mask": torch.from_numpy(mask),
            "channels": torch.from_numpy(channels), "row_ids": torch.from_numpy(row_ids),
            "positions": torch.from_numpy(positions), "row_tiles": torch.from_numpy(row_tiles),
            "target_bytes": torch.from_numpy(nbytes)}


class WindowStream:
    """The endless training stream of packed windows of one split (see the module docstring).

    Epoch e: the rows in epoch_order(n, seed, e), packed by `pack_windows`, then the windows shuffled
    by (seed, e). Windows of consecutive epochs follow each other; window w of the stream is found by
    packing the epochs before it (a few ms each; the last two epochs are cached), so any step can
    be computed without replaying the steps before it.
    """

    def __init__(self, lengths: np.ndarray, seq_len: int, seed: int, lookahead: int = LOOKAHEAD):
        self.lengths, self.seq_len, self.seed, self.lookahead = np.asarray(lengths), seq_len, seed, lookahead
        self.slots, self.tiles = window_slots(self.lengths, seq_len), tile_slots(self.lengths, seq_len)
        self._starts = [0]  # stream index of each packed epoch's first window; one more entry than epochs
        self._cache: dict[int, list[np.ndarray]] = {}

    def epoch(self, e: int) -> list[np.ndarray]:
        if e not in self._cache:
            order = epoch_order(len(self.lengths), self.seed, e)
            windows = pack_windows(self.lengths, order, self.seq_len, self.lookahead)
            shuffle = np.random.default_rng([self.seed, e, 1]).permutation(len(windows))
            self._cache = {k: v for k, v in self._cache.items() if k == e - 1}
            self._cache[e] = [windows[i] for i in shuffle]
        return self._cache[e]

    def _locate(self, w: int) -> tuple[int, int]:
        """(epoch, index within it) of stream window w, packing epochs as far as needed."""
        while self._starts[-1] <= w:
            e = len(self._starts) - 1
            self._starts.append(self._starts[-1] + len(self.epoch(e)))
        e = bisect.bisect_right(self._starts, w) - 1
        return e, w - self._starts[e]

    def windows(self, start: int, count: int) -> list[np.ndarray]:
        out = []
        for w in range(start, start + count):
            e, i = self._locate(w)
            out.append(self.epoch(e)[i])
        return out

    def batch(self, step: int, batch_size: int) -> list[np.ndarray]:
        """The batch_size windows of global batch `step` (0-based)."""
        return self.windows(step * batch_size, batch_size)


class ReplayWindows:
    """Whole windows of seq_len positions cut from the replay token shards (corpus.replay), memory-mapped.

    Shard s holds (len_s - 1) // T chunks; chunk c of a shard is tokens [c*T, c*T + T + 1). Replay epoch e
    visits every chunk once in a permutation of (seed, e), so window r of the stream is found directly.
    A document is `[bos] ids [eos]`: positions restart at each bos, attention stays inside a document
    (row_ids number the documents of the window), and no position is trained to predict the next
    document's bos. Replay has no channel state: its windows carry zero channels and no row slot
    (row_tiles all PAD_ROW), so the channel injection adds nothing there.
    """

    def __init__(self, folder: str | Path, manifest: dict, seq_len: int, bos_id: int, seed: int):
        self.seq_len, self.bos_id, self.seed = seq_len, bos_id, seed
        self.shards = [np.load(Path(folder) / s["file"], mmap_mode="r") for s in manifest["shards"]]
        counts = [max(0, (len(a) - 1) // seq_len) for a in self.shards]
        self.starts = np.cumsum([0, *counts])
        if self.starts[-1] == 0:
            raise ValueError(f"the replay shards hold {manifest['tokens']:,} tokens: not one window of seq_len "
                             f"{seq_len}; raise replay.tokens")
        self._perm: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return int(self.starts[-1])

    def tokens(self, r: int) -> np.ndarray:
        """The T + 1 tokens of stream window r (0-based, across replay epochs)."""
        epoch, i = divmod(r, len(self))
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch, 2]).permutation(len(self)))
        chunk = int(self._perm[1][i])
        shard = int(np.searchsorted(self.starts, chunk, side="right") - 1)
        at = (chunk - int(self.starts[shard])) * self.seq_len
        return np.asarray(self.shards[shard][at:at + self.seq_len + 1], dtype=np.int64)

    def batch(self, windows: Sequence[int], channels: tuple[int, int, int], tiles: int) -> dict[str, Tensor]:
        """Stream windows -> the tensors make_window_batch gives corpus windows (channels [B, R, C, D] zero)."""
        T = self.seq_len
        toks = np.stack([self.tokens(r) for r in windows]) if windows else np.zeros((0, T + 1), np.int64)
        idx, tgt = toks[:, :-1], toks[:, 1:]
        starts = idx == self.bos_id
        row_ids = np.cumsum(starts, axis=1)  # the document of each position (0: one begun before the window)
        at = np.arange(T)[None, :]
        begun = np.maximum.accumulate(np.where(starts, at, 0), axis=1)
        positions = at - begun
        mask = (tgt != self.bos_id).astype(np.float32)
        B, (R, C, D) = len(windows), channels
        return {"idx": torch.from_numpy(np.ascontiguousarray(idx)),
                "targets": torch.from_numpy(np.ascontiguousarray(tgt)),
                "loss_mask": torch.from_numpy(mask), "channels": torch.zeros(B, R, C, D),
                "row_ids": torch.from_numpy(row_ids.astype(np.int64)), "positions": torch.from_numpy(positions),
                "row_tiles": torch.full((B, tiling(T)[0], tiles), PAD_ROW, dtype=torch.int64),
                "target_bytes": torch.zeros(B, dtype=torch.int64)}

    def loss_tokens(self, r: int) -> int:
        return int((self.tokens(r)[1:] != self.bos_id).sum())


def mixed_source(w: int, share: float) -> tuple[bool, int]:
    """Window w of the training stream -> (is replay, its index in that source's own stream).

    Corpus windows are spread evenly: window w is a corpus window when floor((w+1)(1-share)) passes an
    integer, so any prefix of the stream holds round-about (1 - share) of its windows from the corpus and
    any step's windows are computed without the ones before them.
    """
    corpus_share = 1.0 - share
    before = math.floor(w * corpus_share + 1e-9)
    if math.floor((w + 1) * corpus_share + 1e-9) > before:
        return False, before
    return True, w - before


class TrainBatches:
    """What the trainer draws each step, packed (windows) or padded (one row per sequence).

    `units(step)` is the global batch as batch_size units: an array of row indices (a window, or one
    row) or, with replay, an int (a replay window, models.data.ReplayWindows); `make(units)` builds the
    tensors; `real_tokens` / `loss_tokens` count what those units hold (tok/s counts real tokens, the loss
    is normalised by loss tokens). `slots` is the row-slot axis of the channels (R when packed, None when
    each sequence has its own [C, D]).
    """

    def __init__(self, rows: PackedRows, seq_len: int, pad_id: int, seed: int, packed: bool,
                 replay: ReplayWindows | None = None, replay_share: float = 0.0):
        self.rows, self.seq_len, self.pad_id, self.seed, self.packed = rows, seq_len, pad_id, seed, packed
        self.lengths = row_positions(rows, seq_len)
        self.loss_counts = loss_token_counts(rows, seq_len)
        self.stream = WindowStream(self.lengths, seq_len, seed) if packed else None
        self.slots = self.stream.slots if self.stream is not None else None
        if replay is not None and self.stream is None:
            raise ValueError("replay needs packed training: set train.packing: true (a model that reads rows one "
                             "per sequence, e.g. the adapter, cannot mix replay windows)")
        self.replay, self.replay_share = replay, replay_share if replay is not None else 0.0

    def units(self, step: int, batch_size: int) -> list[np.ndarray | int]:
        if self.stream is None:
            return [np.array([r]) for r in batch_rows(len(self.rows), batch_size, self.seed, step)]
        if self.replay is None:
            return list(self.stream.batch(step, batch_size))
        out: list[np.ndarray | int] = []
        for w in range(step * batch_size, (step + 1) * batch_size):
            is_replay, i = mixed_source(w, self.replay_share)
            out.append(int(i) if is_replay else self.stream.windows(i, 1)[0])
        return out

    def make(self, units: Sequence[np.ndarray | int]) -> dict[str, Tensor]:
        if self.stream is None:
            return make_batch(self.rows, np.concatenate(units), self.seq_len, self.pad_id)
        corpus = [u for u in units if not isinstance(u, int)]
        batch = make_window_batch(self.rows, corpus, self.seq_len, self.pad_id, self.stream.slots, self.stream.tiles)
        if len(corpus) == len(units):
            return batch
        _, C, D = self.rows.channels.shape
        extra = self.replay.batch([u for u in units if isinstance(u, int)], (self.stream.slots, C, D),
                                  self.stream.tiles)
        order = np.argsort([isinstance(u, int) for u in units], kind="stable")  # corpus first, then replay
        back = torch.from_numpy(np.argsort(order, kind="stable"))  # ... put back in stream order
        return {k: torch.cat([batch[k], extra[k]])[back] for k in batch}

    def real_tokens(self, units: Sequence[np.ndarray | int]) -> int:
        return int(sum(self.seq_len if isinstance(u, int) else self.lengths[u].sum() for u in units))

    def loss_tokens(self, units: Sequence[np.ndarray | int]) -> int:
        return int(sum(self.replay.loss_tokens(u) if isinstance(u, int) else self.loss_counts[u].sum()
                       for u in units))


# ---- evaluation ---------------------------------------------------------------------------------
def pad_batch(batch: dict[str, Tensor], size: int, pad_id: int) -> dict[str, Tensor]:
    """Append empty sequences (pad tokens, mask 0, zero channels, padding rows) up to `size`: one shape."""
    extra = size - batch["idx"].size(0)
    if extra <= 0:
        return batch
    fill = {"idx": pad_id, "targets": pad_id, "row_ids": PAD_ROW, "row_tiles": PAD_ROW}
    out = {}
    for k, v in batch.items():
        out[k] = torch.cat([v, torch.full((extra, *v.shape[1:]), fill.get(k, 0), dtype=v.dtype)])
    return out


def eval_batches(rows: PackedRows, batch_size: int, seq_len: int, pad_id: int,
                 fixed_shape: bool = False, packed: bool = False) -> Iterator[dict[str, Tensor]]:
    """Every row once, with `target_bytes` [B] for bits per byte: rows in order, or (`packed`) windows
    of whole rows packed best fit in row order; batch_size sequences per batch.

    The last batch may be smaller, unless `fixed_shape` (XLA): then it is padded with empty sequences
    that carry no loss and no bytes, so evaluation compiles one graph.
    """
    if packed:
        lengths = row_positions(rows, seq_len)
        windows = pack_windows(lengths, range(len(rows)), seq_len)
        slots, tiles = window_slots(lengths, seq_len), tile_slots(lengths, seq_len)
        for start in range(0, len(windows), batch_size):
            batch = make_window_batch(rows, windows[start:start + batch_size], seq_len, pad_id, slots, tiles)
            yield pad_batch(batch, batch_size, pad_id) if fixed_shape else batch
        return
    for start in range(0, len(rows), batch_size):
        index = np.arange(start, min(start + batch_size, len(rows)))
        batch = make_batch(rows, index, seq_len, pad_id)
        batch["target_bytes"] = torch.from_numpy(rows.target_bytes[index])
        yield pad_batch(batch, batch_size, pad_id) if fixed_shape else batch
