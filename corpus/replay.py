"""Language-model replay: general text streamed through `datasets`, tokenised in parallel into token shards.

A small channel model trained on its channel corpus alone would loop over a few hundred thousand
tokens for dozens of epochs; the reference native run saw ~1B tokens of channel corpus plus replay.
Replay is therefore a *stream*, never a list in memory:

- `stream_texts` reads the source lazily (`datasets.load_dataset(..., streaming=True)`): a hub dataset
  pinned to a `revision` (the production default), or local parquet/jsonl/json/csv/txt files.
- `sample_text` takes the first `chars` of it for the tokenizer (SentencePiece sees replay prose, so a
  32k vocabulary is supportable; the corpus's template text alone supports a few thousand pieces).
- `write_shards` tokenises the stream with a process pool (imap over ordered chunks: the same source
  and tokenizer give the same bytes whatever the worker count) into flat uint16/uint32 `.npy` shards,
  each document `[bos] ids [eos]`, until `tokens` are written. The trainer (models.data.ReplayWindows)
  memory-maps them and cuts whole windows of seq_len tokens, attention kept inside each document.
"""

from __future__ import annotations

import collections
import json
import multiprocessing
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from tinymars.artifacts import hash_json, sha256_file, write_atomic
from tinymars.profile import is_local_source

BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv", ".txt": "text"}
CHUNK_TEXTS = 256  # texts per worker task: large enough to amortise pickling, small enough to stop near `tokens`
SENTENCE_CHARS = 2000  # SentencePiece skips training sentences over 4192 bytes: longer docs are cut at spaces


class ReplayError(ValueError):
    """A replay source that cannot be used; the message names the field and the fix."""


def source_fingerprint(section: Any) -> str:
    """What identifies the text: the local files' hashes, or the hub name + config + split + pinned revision."""
    path = Path(section.source).expanduser()
    if not path.exists():
        return hash_json({"hub": section.source, "config": section.config, "split": section.split,
                          "revision": section.revision})
    files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]
    return hash_json({f.relative_to(path).as_posix() if path.is_dir() else f.name: sha256_file(f) for f in files})


def check_source(section: Any) -> None:
    """Refuse before any work: a local path that is missing, of an unknown kind, empty or not UTF-8."""
    path = Path(section.source).expanduser()
    if not is_local_source(section.source):
        return  # a hub source: its revision is checked by the profile, its reachability when the stage reads it
    if not path.exists():
        raise ReplayError(f"replay.source: local path '{section.source}' does not exist; point it at a "
                          f"{'/'.join(sorted(BUILDERS))} file or folder, or a hub dataset name with a revision")
    if path.is_file():
        if path.suffix.lower() not in BUILDERS:
            raise ReplayError(f"replay.source: '{section.source}' has an unknown suffix; use one of "
                              f"{', '.join(sorted(BUILDERS))}")
        if BUILDERS[path.suffix.lower()] != "parquet":
            check_utf8(path)


def _dataset(section: Any, cache_dir: Path) -> Any:
    import datasets

    path = Path(section.source).expanduser()
    if path.is_file():
        return datasets.load_dataset(BUILDERS[path.suffix.lower()], data_files=str(path), split="train",
                                     streaming=True, cache_dir=str(cache_dir))
    if path.is_dir():
        return datasets.load_dataset(str(path), section.config, split=section.split, streaming=True,
                                     cache_dir=str(cache_dir))
    return datasets.load_dataset(section.source, section.config, split=section.split, revision=section.revision,
                                 streaming=True, cache_dir=str(cache_dir))


def stream_texts(section: Any, cache_dir: Path) -> Iterator[str]:
    """The source's non-empty `text_field` strings, in the source's order, read lazily."""
    check_source(section)
    try:
        ds = _dataset(section, cache_dir)
        rows = iter(ds)
        first = next(rows, None)
    except Exception as exc:  # datasets raises many kinds (offline, missing split or revision, bad file)
        cause = f" (cause: {exc.__cause__})" if exc.__cause__ is not None else ""
        raise ReplayError(
            f"replay.source: cannot read '{section.source}' (split '{section.split}'"
            + (f", revision {section.revision}" if section.revision else "") + f"): {type(exc).__name__}: {exc}{cause}"
            [:600] + "; point it at local parquet/jsonl/txt files, or check the name, revision and the network"
        ) from None
    if first is None:
        raise ReplayError(f"replay.source: '{section.source}' has no rows; point it at a source with text")
    if section.text_field not in first:
        raise ReplayError(f"replay.text_field: '{section.text_field}' is not a column of '{section.source}'; "
                          f"columns: {', '.join(first)}")
    seen = 0
    for row in _chain(first, rows):
        text = row.get(section.text_field)
        if isinstance(text, str) and text.strip():
            seen += 1
            yield text.strip()
    if seen == 0:
        raise ReplayError(f"replay.source: '{section.source}' has no non-empty text in field '{section.text_field}'; "
                          "point it at a source with text or remove the replay section")


def _chain(first: dict, rest: Iterator[dict]) -> Iterator[dict]:
    yield first
    yield from rest


def check_utf8(path: Path, chunk: int = 1 << 20) -> None:
    """Refuse an empty or non-UTF-8 text file up front, naming the byte offset (datasets only says it failed)."""
    import codecs

    decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            try:
                decoder.decode(block)
            except UnicodeDecodeError as exc:
                raise ReplayError(f"replay.source: '{path}' is not UTF-8 (byte 0x{block[exc.start]:02x} at "
                                  f"offset {offset + exc.start}); re-save it as UTF-8, e.g. iconv -f latin1 -t utf-8"
                                  ) from None
            offset += len(block)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise ReplayError(f"replay.source: '{path}' is not UTF-8 (it ends inside a multi-byte character); "
                          "re-save it as UTF-8") from None
    if offset == 0:
        raise ReplayError(f"replay.source: '{path}' is empty; point it at a file with text rows or remove "
                          "the replay section")


def sentences(text: str, max_chars: int = SENTENCE_CHARS) -> Iterator[str]:
    """`text` in pieces of at most max_chars, cut at line breaks or spaces (SentencePiece drops longer ones)."""
    for line in text.splitlines():
        while len(line) > max_chars:
            cut = line.rfind(" ", 0, max_chars)
            cut = cut if cut > 0 else max_chars
            yield line[:cut]
            line = line[cut:].lstrip()
        if line.strip():
            yield line


def sample_text(texts: Iterable[str], chars: int) -> list[str]:
    """The first `chars` characters of the stream as tokenizer training sentences."""
    out: list[str] = []
    taken = 0
    for text in texts:
        if taken >= chars:
            break
        for s in sentences(text[: chars - taken]):
            out.append(s)
            taken += len(s)
    return out


# ---------------------------------------------------------------- tokenising into shards
_WORKER: dict[str, Any] = {}


def _init_worker(model_path: str) -> None:
    import sentencepiece as spm

    _WORKER["sp"] = spm.SentencePieceProcessor(model_file=model_path)


def _encode_chunk(texts: list[str]) -> list[np.ndarray]:
    sp = _WORKER["sp"]
    bos, eos = sp.bos_id(), sp.eos_id()
    return [np.asarray([bos, *ids, eos], dtype=np.int64) for ids in sp.encode(texts)]


def _chunks(texts: Iterable[str], size: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for t in texts:
        chunk.append(t)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _encoded(chunks: Iterator[list[str]], tokenizer_model: Path, workers: int) -> Iterator[list[np.ndarray]]:
    """Chunks encoded in order, `workers` processes at a time, at most 2 x workers chunks in flight: a pool's
    imap would read the whole (possibly billions of tokens) stream ahead into its queue."""
    if workers <= 1:
        _init_worker(str(tokenizer_model))
        yield from map(_encode_chunk, chunks)
        return
    ctx = multiprocessing.get_context("spawn")  # no fork of a process holding torch / Prefect threads
    with ctx.Pool(workers, initializer=_init_worker, initargs=(str(tokenizer_model),)) as pool:
        flight: collections.deque = collections.deque()
        for chunk in chunks:
            flight.append(pool.apply_async(_encode_chunk, (chunk,)))
            if len(flight) >= 2 * workers:
                yield flight.popleft().get()
        while flight:
            yield flight.popleft().get()


def resolve_workers(workers: int | str) -> int:
    return min(32, os.cpu_count() or 1) if workers == "auto" else int(workers)


def write_shards(texts: Iterable[str], tokenizer_model: Path, vocab_size: int, tokens: int, shard_tokens: int,
                 out: Path, workers: int = 1, progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Tokenise `texts` into out/replay-NNNNN.npy shards of about shard_tokens, stopping at `tokens`.

    Returns the manifest (also written to out/replay.json): shards with their tokens and sha256, the
    total, the documents and characters read, and whether the source ran out before `tokens`.
    """
    out.mkdir(parents=True, exist_ok=True)
    dtype = np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32
    shards: list[dict[str, Any]] = []
    pending: list[np.ndarray] = []
    held = total = docs = 0

    def flush() -> None:
        nonlocal pending, held
        if not pending:
            return
        name = f"replay-{len(shards):05d}.npy"
        tmp = out / f".{name}.tmp"
        with open(tmp, "wb") as f:
            np.save(f, np.concatenate(pending).astype(dtype))
        os.replace(tmp, out / name)
        shards.append({"file": name, "tokens": held, "sha256": sha256_file(out / name)})
        pending, held = [], 0

    counted = _counting(texts)
    for batch in _encoded(_chunks(counted, CHUNK_TEXTS), tokenizer_model, workers):
        for doc in batch:
            doc = doc[: tokens - total]
            pending.append(doc)
            held += len(doc)
            total += len(doc)
            docs += 1
            if held >= shard_tokens:
                flush()
            if total >= tokens:
                break
        if progress is not None:
            progress(total, tokens)
        if total >= tokens:
            break
    flush()
    manifest = {"dtype": np.dtype(dtype).name, "tokens": total, "wanted_tokens": tokens, "documents": docs,
                "chars_read": counted.chars, "exhausted": total < tokens, "shards": shards}
    write_atomic(out / "replay.json", json.dumps(manifest, indent=1))
    return manifest


class _counting:
    """An iterator over texts that counts the characters it handed out."""

    def __init__(self, texts: Iterable[str]):
        self.texts, self.chars = iter(texts), 0

    def __iter__(self) -> _counting:
        return self

    def __next__(self) -> str:
        text = next(self.texts)
        self.chars += len(text)
        return text
