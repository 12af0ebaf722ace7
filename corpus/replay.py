"""Replay mix: general text mixed into the train split, so a small model keeps its general language
while it learns the channel capabilities.

The text comes through `datasets`: a local .parquet / .jsonl / .json / .csv / .txt file or a folder
(read offline), or a hub dataset name (needs the network). A replay row has no channel state and an
empty prompt; the whole text is the target. Rows are chosen by a seeded shuffle, so the same source
and seed give the same rows; they are always `split: "train"` (eval never scores them).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from corpus.rows import make_row
from tinymars.artifacts import hash_json, sha256_file

BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv", ".txt": "text"}


class ReplayError(ValueError):
    """A replay source that cannot be used; the message names the field and the fix."""


def source_fingerprint(source: str) -> str:
    """What identifies the source's content: a hash of a local file or folder's files, else the hub name."""
    path = Path(source).expanduser()
    if not path.exists():
        return f"hub:{source}"
    files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]
    return hash_json({f.relative_to(path).as_posix() if path.is_dir() else f.name: sha256_file(f) for f in files})


def load_texts(source: str, config: str | None, split: str, text_field: str, cache_dir: Path) -> list[str]:
    """The non-empty strings of `text_field` (a .txt file's field is `text`: one row per line)."""
    import datasets

    path = Path(source).expanduser()
    try:
        if path.is_file():
            builder = BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise ReplayError(f"corpus.replay.source: '{source}' has an unknown suffix; use one of "
                                  f"{', '.join(sorted(BUILDERS))}")
            if builder != "parquet":
                check_utf8(path)
            ds = datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=str(cache_dir))
        elif path.is_dir():
            ds = datasets.load_dataset(str(path), config, split=split, cache_dir=str(cache_dir))
        else:
            ds = datasets.load_dataset(source, config, split=split, cache_dir=str(cache_dir))
    except ReplayError:
        raise
    except Exception as exc:  # datasets raises many kinds (offline, missing split, bad file)
        cause = f" (cause: {exc.__cause__})" if exc.__cause__ is not None else ""  # e.g. the JSON parse error
        raise ReplayError(
            f"corpus.replay.source: cannot load '{source}' (split '{split}'): {type(exc).__name__}: {exc}{cause}"[:600]
            + "; point it at a local parquet/jsonl/txt file or check the name and the network"
        ) from None
    if text_field not in ds.column_names:
        raise ReplayError(f"corpus.replay.text_field: '{text_field}' is not a column of '{source}'; "
                          f"columns: {', '.join(ds.column_names)}")
    texts = [t.strip() for t in ds[text_field] if isinstance(t, str) and t.strip()]
    if not texts:
        raise ReplayError(f"corpus.replay.source: '{source}' has no non-empty text in field '{text_field}' "
                          f"({len(ds)} rows); point it at a source with text or remove corpus.replay")
    return texts


def check_utf8(path: Path, chunk: int = 1 << 20) -> None:
    """Refuse an empty or non-UTF-8 text file up front, naming the byte offset (datasets only says it failed)."""
    import codecs

    decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            try:
                decoder.decode(block)
            except UnicodeDecodeError as exc:
                raise ReplayError(f"corpus.replay.source: '{path}' is not UTF-8 (byte 0x{block[exc.start]:02x} at "
                                  f"offset {offset + exc.start}); re-save it as UTF-8, e.g. iconv -f latin1 -t utf-8"
                                  ) from None
            offset += len(block)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise ReplayError(f"corpus.replay.source: '{path}' is not UTF-8 (it ends inside a multi-byte character); "
                          "re-save it as UTF-8") from None
    if offset == 0:
        raise ReplayError(f"corpus.replay.source: '{path}' is empty; point it at a file with text rows or remove "
                          "corpus.replay")


def clip(text: str, max_chars: int) -> str:
    """At most `max_chars`, cut at the last space before the limit when there is one."""
    if len(text) <= max_chars:
        return text
    cut = text[:max_chars]
    return cut[: cut.rfind(" ")] if " " in cut else cut


def replay_rows(texts: list[str], train_rows: int, ratio: float, max_chars: int, seed: int) -> tuple[list[dict], dict]:
    """round(ratio * train_rows) replay rows (fewer if the source is short) and their stats."""
    wanted = round(ratio * train_rows)
    order = list(range(len(texts)))
    random.Random(f"tinymars/{seed}/replay").shuffle(order)
    rows = [
        make_row(row_id=f"rpl-{n:05d}", prompt_id=f"rpl-{n:05d}", capability="replay", kind="replay",
                 prompt="", items=None, salient_item=None, pole=None, text_pole=None, channel_state={},
                 target=clip(texts[i], max_chars))
        for n, i in enumerate(order[:wanted])
    ]
    for row in rows:
        row["split"] = "train"
    stats: dict[str, Any] = {"wanted": wanted, "rows": len(rows), "available": len(texts),
                             "chars": sum(len(r["target"]) for r in rows)}
    return rows, stats
