"""The one artifact store and hashing helper: content-addressed stage outputs, built atomically.

A stage output lives at `ROOT/<stage>/<key>/` with a `manifest.json` listing every file's sha256.
It is built in a temporary folder and renamed into place only once complete, so a crash or a
kill never leaves a folder under a key that a rerun would trust; on every reuse the files are
re-hashed, and a folder that no longer matches its manifest is moved aside and rebuilt.

Volatile files: a builder may name files whose bytes legitimately differ between two builds from
the same inputs (wall-clock figures such as tokens/s). They are listed in the manifest under
`volatile`, verified like every other file (a flipped byte is still caught), but left out of the
content hash, so an identical rebuild keeps its identity and everything downstream stays cached.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
FORMAT = 1
log = logging.getLogger("tinymars.artifacts")


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def hash_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def hash_json(obj: Any) -> str:
    return hash_bytes(canonical_json(obj).encode())


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def code_version(paths: Iterable[Path]) -> str:
    """Hash the source files a stage runs, so editing them invalidates that stage's cache."""
    h = hashlib.sha256()
    files: list[Path] = []
    for p in paths:
        files.extend(sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p])
    for f in sorted(files):
        if f.suffix in (".py", ".json", ".yaml", ".txt") and "__pycache__" not in f.parts:
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def stage_key(stage: str, code: str, section: Any, inputs: dict[str, str]) -> str:
    """A stage's cache key: its code version, its profile section and its inputs' content hashes."""
    return hash_json({"stage": stage, "code": code, "section": section, "inputs": inputs})[:32]


@dataclass(frozen=True)
class Artifact:
    """A small, picklable handle to a verified stage output (passed between tasks instead of data)."""

    stage: str
    key: str
    path: str
    content_hash: str
    files: dict[str, dict[str, Any]]
    rows: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    volatile: list[str] = field(default_factory=list)  # verified, but not part of content_hash

    def file(self, name: str) -> Path:
        if name not in self.files:
            raise KeyError(f"artifact {self.stage}/{self.key} has no file '{name}'")
        return Path(self.path) / name

    @property
    def bytes(self) -> int:
        return sum(int(f["bytes"]) for f in self.files.values())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ArtifactCorrupt(RuntimeError):
    pass


class DiskFull(OSError):
    """A write failed for lack of space (or a file size limit); the message names the file and the fix."""


_FULL_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}
_FULL_TEXTS = ("No space left on device", "File too large", "Disk quota exceeded")


def out_of_space(exc: BaseException) -> bool:
    """Whether `exc` is a full disk / size limit (libraries such as safetensors wrap the OSError in their own)."""
    return getattr(exc, "errno", None) in _FULL_ERRNOS or any(t in str(exc) for t in _FULL_TEXTS)


def disk_full(path: Path | str, exc: BaseException) -> DiskFull:
    return DiskFull(f"disk full or file size limit reached while writing {path} ({exc}); free space there (or "
                    "raise the limit) and rerun: finished stages stay cached and nothing half-written is kept")


def _manifest_files(folder: Path) -> dict[str, dict[str, Any]]:
    out = {}
    for f in sorted(folder.rglob("*")):
        if f.is_file() and f.name != MANIFEST:
            out[f.relative_to(folder).as_posix()] = {"sha256": sha256_file(f), "bytes": f.stat().st_size}
    return out


def _content_hash(stage: str, files: dict[str, dict[str, Any]], volatile: Iterable[str] = ()) -> str:
    """The artifact's identity: every file's sha256 except the volatile ones (wall-clock figures)."""
    skip = set(volatile)
    return hash_json({"stage": stage, "files": {k: v["sha256"] for k, v in files.items() if k not in skip}})


def verify(folder: Path) -> Artifact:
    """Re-hash every file of a built folder against its manifest; raise ArtifactCorrupt on any mismatch."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise ArtifactCorrupt(f"{folder / MANIFEST}: missing or unreadable ({type(exc).__name__})") from None
    problems = []  # each names the damaged file by its full path, so the warning says where to look
    for rel, info in manifest["files"].items():
        f = folder / rel
        if not f.is_file():
            problems.append(f"{f}: missing")
        elif f.stat().st_size != info["bytes"]:
            problems.append(f"{f}: size {f.stat().st_size} != {info['bytes']} bytes in the manifest")
        elif sha256_file(f) != info["sha256"]:
            problems.append(f"{f}: sha256 mismatch")
    volatile = manifest.get("volatile", [])
    if _content_hash(manifest["stage"], manifest["files"], volatile) != manifest["content_hash"]:
        problems.append(f"{folder / MANIFEST}: content hash does not match its file list")
    if problems:
        raise ArtifactCorrupt("; ".join(problems))
    return Artifact(
        stage=manifest["stage"],
        key=manifest["key"],
        path=str(folder),
        content_hash=manifest["content_hash"],
        files=manifest["files"],
        rows=manifest.get("rows"),
        meta=manifest.get("meta", {}),
        volatile=list(volatile),
    )


class ArtifactStore:
    def __init__(self, root: Path | str):
        self.root = Path(root)

    def folder(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def lookup(self, stage: str, key: str, warn: Callable[[str], object] | None = None) -> Artifact | None:
        """A verified artifact under this key, or None; a corrupt one is quarantined with a warning."""
        folder = self.folder(stage, key)
        if not folder.exists():
            return None
        try:  # a folder under a key without a manifest was damaged after publishing (build writes it first)
            return verify(folder)
        except ArtifactCorrupt as exc:
            aside = folder.with_name(f".corrupt-{key}-{int(time.time())}-{uuid.uuid4().hex[:6]}")
            (warn or log.warning)(f"artifact no longer matches its manifest, rebuilding: {exc} (moved to {aside})")
            try:
                folder.rename(aside)
            except OSError:
                shutil.rmtree(folder, ignore_errors=True)
            return None

    def build(
        self,
        stage: str,
        key: str,
        builder: Callable[[Path], dict[str, Any] | None],
        inputs: dict[str, str] | None = None,
        replace: bool = False,
    ) -> Artifact:
        """Run `builder(tmp_folder)` and publish the folder atomically under the key.

        The builder returns None or `{"rows": n, "meta": {...}, "volatile": [file, ...]}` (see the module doc).

        `replace` (a forced rebuild) swaps out a folder already under the key; otherwise a folder
        another run published first wins, if it verifies.
        """
        parent = self.root / stage
        parent.mkdir(parents=True, exist_ok=True)
        tmp = parent / f".tmp-{key}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            info = builder(tmp) or {}
            files = _manifest_files(tmp)
            volatile = sorted(info.get("volatile", []))
            if unknown := set(volatile) - set(files):
                raise ValueError(f"{stage}: volatile file(s) {sorted(unknown)} were not written")
            manifest = {
                "format": FORMAT,
                "stage": stage,
                "key": key,
                "content_hash": _content_hash(stage, files, volatile),
                "files": files,
                "volatile": volatile,
                "rows": info.get("rows"),
                "meta": info.get("meta", {}),
                "inputs": inputs or {},
            }
            _write_atomic(tmp / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())
            _fsync_dir(tmp)
            final = self.folder(stage, key)
            if replace and final.exists():
                old = final.with_name(f".replaced-{key}-{uuid.uuid4().hex[:6]}")
                final.rename(old)
                shutil.rmtree(old, ignore_errors=True)
            try:
                os.rename(tmp, final)
            except OSError:
                # Another run published the same key first; keep theirs if it verifies.
                existing = self.lookup(stage, key)
                if existing is not None:
                    shutil.rmtree(tmp, ignore_errors=True)
                    return existing
                os.rename(tmp, final)
            _fsync_dir(parent)
            return verify(final)
        except BaseException as exc:
            full = out_of_space(exc) and not isinstance(exc, DiskFull)
            # the file being written when space ran out: the newest one in the build folder
            where = full and (getattr(exc, "filename", None) or _newest_file(tmp))
            shutil.rmtree(tmp, ignore_errors=True)
            if full:
                raise disk_full(f"{where} (building the {stage} artifact)", exc) from None
            raise


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:6]}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if out_of_space(exc):
            raise disk_full(path, exc) from None
        raise
    os.replace(tmp, path)


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write a file so that readers see either the old content or the new, never half."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(Path(path), data.encode() if isinstance(data, str) else data)


def _newest_file(folder: Path) -> Path:
    files = [f for f in folder.rglob("*") if f.is_file()]
    return max(files, key=lambda f: f.stat().st_mtime_ns) if files else folder


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
