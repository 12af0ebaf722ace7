"""What every stage task shares: its code version, the cache decision, and the record it hands back.

Caching is ours, not Prefect's: a stage's key is its code version (its source files and the versions
of the libraries that shape its bytes: STAGE_SOURCES, STAGE_LIBRARIES) + its profile section + its
inputs' content hashes (tinymars.artifacts.stage_key), and a hit is only trusted after the
files re-hash to their manifest. Prefect's own result cache would return a manifest whose files
may have changed underneath it, so tasks run with NO_CACHE and decide here.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any

from prefect import get_run_logger
from prefect.exceptions import MissingContextError

from tinymars.artifacts import Artifact, ArtifactStore, code_version, hash_json, sha256_file, stage_key, write_atomic
from tinymars.progress import Progress

ROOT = Path(__file__).resolve().parents[1]

# The source files each stage runs; editing one invalidates that stage (and, through content
# hashes, whatever its output change reaches downstream). generate/score/report: tests/test_stage_split.py
# checks that every module of ours their task modules import (transitively) is listed here.
STAGE_SOURCES: dict[str, tuple[str, ...]] = {
    "corpus": ("corpus/template_teacher.py", "corpus/rows.py", "corpus/overlap.py", "corpus/encode.py", "corpus/data",
               "tasks/corpus.py", "scorers/register.py", "scorers/selection.py", "scorers/text.py",
               "scorers/lexicons.json", "tinymars/domain.py"),
    "channels": ("corpus/channels.py", "corpus/encode.py", "corpus/embed.py", "tasks/channels.py",
                 "tinymars/domain.py"),
    "tokenizer": ("corpus/tokenizer.py", "corpus/replay.py", "tasks/tokenizer.py"),
    "replay": ("corpus/replay.py", "corpus/tokenizer.py", "tasks/replay.py", "tasks/tokenizer.py"),
    "pack": ("corpus/pack.py", "corpus/tokenizer.py", "tasks/pack.py"),
    "train": (
        "models/config.py", "models/gpt.py", "models/architectures.py", "models/data.py", "models/trainer.py",
        "models/adapter.py", "models/checkpoint.py", "models/weights.py", "models/distributed.py", "models/sizing.py",
        "models/launch.py", "models/train_cli.py", "models/controls.py", "tasks/train.py",
        "models/vocab_common.py", "models/vocab_graph.py", "models/vocab_conv.py", "tinymars/domain.py",
    ),
    "steer": ("corpus/concepts.py", "corpus/encode.py", "corpus/tokenizer.py", "models/activations.py",
              "models/steering.py", "models/adapter.py", "models/checkpoint.py", "models/weights.py",
              "models/config.py", "models/gpt.py", "models/architectures.py", "scorers/concept_quality.py",
              "tasks/steering.py", "tinymars/domain.py"),
    # the model side only (scorers/ only for reading and writing rows): a statistics edit re-scores, never regenerates
    "generate": ("models", "corpus/tokenizer.py", "corpus/encode.py", "corpus/concepts.py", "corpus/rows.py",
                 "corpus/channels.py", "scorers/io.py", "scorers/register.py", "scorers/selection.py",
                 "scorers/text.py", "scorers/lexicons.json", "tasks/generate.py", "tinymars/domain.py"),
    "score": ("scorers", "tasks/score.py", "tinymars/domain.py"),
    # everything the report renders or calls: the scorers' tables and headline_metrics (scorers/), the
    # corpus summary (tasks/corpus.py -> corpus/teacher_corpus.py), the plots and the HTML
    "report": ("scorers", "tasks/report.py", "tasks/report_html.py", "tasks/report_plots.py", "tasks/corpus.py",
               "corpus/teacher_corpus.py", "corpus/rows.py", "tinymars/domain.py"),
}

# The libraries whose output a stage's bytes depend on (distribution names as pip knows them): their
# versions join the stage's code version, so an upgrade rebuilds exactly the stages it may change.
# EMBEDDER_WEIGHTS is the channels section's embedder, fingerprinted by the sha256 of its local files.
EMBEDDER_WEIGHTS = "embedder-weights"
STAGE_LIBRARIES: dict[str, tuple[str, ...]] = {
    "corpus": ("vaderSentiment",),  # pre-flight scoring decides which targets are kept
    "channels": ("sentence-transformers", "transformers", "torch", EMBEDDER_WEIGHTS),
    "tokenizer": ("sentencepiece", "transformers", "tokenizers"),  # kind: hf copies a base's tokenizer
    "replay": ("sentencepiece", "numpy", "datasets"),
    "pack": ("sentencepiece", "transformers", "tokenizers", "pyarrow", "numpy"),
    "train": ("torch",),
    "steer": ("torch", "numpy", "sentencepiece"),
    "generate": ("torch", "sentencepiece"),
    "score": ("numpy", "scipy", "vaderSentiment"),
    "report": ("matplotlib", "numpy"),  # the PNGs inside report.html
}


@cache
def library_version(distribution: str) -> str:
    """The installed version of a distribution (tests monkeypatch this to simulate an upgrade)."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"


def library_versions(stage: str, section: Any = None, home: str | Path | None = None) -> dict[str, str]:
    """STAGE_LIBRARIES[stage] with their versions (and the embedder's fingerprint, read from `section`)."""
    out = {}
    for name in STAGE_LIBRARIES[stage]:
        if name == EMBEDDER_WEIGHTS:
            if not isinstance(section, dict) or "embedder" not in section:
                raise ValueError(f"{stage}: the embedder weights fingerprint needs the channels section")
            out[name] = embedder_fingerprint(section["embedder"]["model"], home)
        else:
            out[name] = library_version(name)
    return out


@cache
def _source_version(stage: str) -> str:
    return code_version(ROOT / p for p in STAGE_SOURCES[stage])


def stage_code_version(stage: str, section: Any = None, home: str | Path | None = None) -> str:
    """What a stage's key holds besides its section and inputs: its source files and library versions."""
    return _code_version(stage, library_versions(stage, section, home))


def _code_version(stage: str, libraries: dict[str, str]) -> str:
    return hash_json({"sources": _source_version(stage), "libraries": libraries})[:16]


WEIGHTS_SKIP = (".md", ".gitattributes", ".gitignore")  # documentation: cannot change an embedding


def embedder_fingerprint(name: str, home: str | Path | None = None) -> str:
    """sha256 over the embedder's local files (weights, config, tokenizer), or `unresolved:NAME` when they
    are not on this machine yet (a hub model not downloaded: the build fetches it, and the next run's key
    names the weights, so the channels stage rebuilds once, to the same bytes). Per-file hashes are cached
    in HOME/cache/file-sha256.json by (path, size, mtime), so a multi-GB model is read once."""
    folder = _embedder_folder(name)
    if folder is None:
        logger().warning(f"[channels] embedder '{name}' has no local files yet; its key names it, not its weights")
        return f"unresolved:{name}"
    files = sorted(f for f in folder.rglob("*") if f.is_file() and not f.name.endswith(WEIGHTS_SKIP)
                   and not any(part.startswith(".") for part in f.relative_to(folder).parts))
    cache_file = Path(home) / "cache" / "file-sha256.json" if home else None
    known = _read_json(cache_file) if cache_file else {}
    hashes, changed = {}, False
    for f in files:
        real = f.resolve()  # hub snapshots are symlinks into blobs
        stat = real.stat()
        stamp = f"{stat.st_size}:{stat.st_mtime_ns}"
        entry = known.get(str(real))
        if entry is None or entry["stamp"] != stamp:
            entry = {"stamp": stamp, "sha256": sha256_file(real)}
            known[str(real)] = entry
            changed = True
        hashes[f.relative_to(folder).as_posix()] = entry["sha256"]
    if cache_file and changed:
        write_atomic(cache_file, json.dumps(known, indent=0, sort_keys=True))
    return hash_json(hashes)


def _embedder_folder(name: str) -> Path | None:
    """The local folder a profile's embedder name loads from (corpus.embed.resolve_model), or None."""
    from corpus.embed import resolve_model

    target = Path(resolve_model(name))
    if target.is_dir():
        return target
    try:
        from huggingface_hub import snapshot_download

        for repo in (name, f"sentence-transformers/{name}") if "/" not in name else (name,):
            try:
                return Path(snapshot_download(repo, local_files_only=True))
            except Exception:  # not in the local cache (the hub client raises many types)
                continue
    except ImportError:
        pass
    return None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def logger():
    try:
        return get_run_logger()
    except MissingContextError:  # called outside a flow (a notebook, a unit test)
        import logging

        return logging.getLogger("tinymars")


def stage_progress(label: str, total: int | None, unit: str = "it") -> Progress:
    """The `progress(done, total, **info)` callback a stage hands its domain code: a terminal bar
    (tinymars.progress: only on a terminal outside CI) and, inside a Prefect flow or task run, a progress
    artifact (key `progress-<label>`) updated at most about once a second. Use it as a context manager."""
    return Progress(label, total, unit, sink=_progress_artifact(label))


def _progress_artifact(label: str) -> Callable[[float, str], None] | None:
    """A writer of one Prefect progress artifact, or None outside a run. A failing API never fails the stage:
    the first error is logged and the artifact is left where it was."""
    from prefect.context import FlowRunContext, TaskRunContext

    if TaskRunContext.get() is None and FlowRunContext.get() is None:
        return None
    from prefect.artifacts import create_progress_artifact, update_progress_artifact

    key = "progress-" + re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")
    state: dict[str, Any] = {"id": None, "broken": False}

    def write(percent: float, description: str) -> None:
        if state["broken"]:
            return
        try:
            if state["id"] is None:
                state["id"] = create_progress_artifact(percent, key=key, description=description, _sync=True)
            else:
                update_progress_artifact(state["id"], percent, description=description, _sync=True)
        except Exception as exc:  # the UI's view of progress is not worth a stage
            state["broken"] = True
            logger().warning(f"[{label}] progress artifact not updated: {type(exc).__name__}: {exc}")

    return write


def run_stage(
    stage: str,
    home: str,
    section: Any,
    inputs: dict[str, Artifact],
    build: Callable[[Path], dict[str, Any] | None],
    force: bool = False,
    name: str | None = None,
) -> dict[str, Any]:
    """Reuse the verified artifact under this stage's key, or build it; return the lineage hand-back."""
    log = logger()
    label = name or stage
    store = ArtifactStore(Path(home) / "artifacts")
    input_hashes = {k: a.content_hash for k, a in inputs.items()}
    libraries = library_versions(stage, section, home)  # every stage's key names them: no task can forget
    key = stage_key(stage, _code_version(stage, libraries), section, input_hashes)
    t0 = time.perf_counter()
    failed_verification: list[str] = []  # a quarantined folder is named in the stage's lineage row

    def warn(message: str) -> None:
        log.warning(message)
        failed_verification.append(message)

    artifact = None if force else store.lookup(stage, key, warn=warn)
    hit = artifact is not None
    if hit:
        log.info(f"[{label}] cache hit {key[:12]} -> {artifact.path}")
    handed_back: dict[str, Any] = {}
    if not hit:
        log.info(f"[{label}] {'forced rebuild' if force else 'building'} (key {key[:12]})")

        def build_and_collect(out: Path) -> dict[str, Any]:
            # Records that belong in lineage but not in the artifact (e.g. paid teacher calls).
            info = dict(build(out) or {})
            handed_back["teacher_calls"] = info.pop("teacher_calls", [])
            info["meta"] = {**info.get("meta", {}), "libraries": libraries}  # what built it, for the curious
            return info

        artifact = store.build(stage, key, build_and_collect, inputs=input_hashes, replace=force)
    duration = time.perf_counter() - t0
    if not hit:
        log.info(f"[{label}] done in {duration:.1f}s: {len(artifact.files)} files, {artifact.bytes:,} bytes")
    metrics = artifact.meta.get("metrics", {})
    return {
        "stage": stage,
        "name": label,
        "key": key,
        "cache_hit": hit,
        "status": "completed",
        "error": f"rebuilt: {failed_verification[0]}"[:2000] if failed_verification else None,
        "duration_s": duration,
        "artifact": artifact.to_dict(),
        "inputs": input_hashes,
        "metrics": [{"key": k, "value": v} for k, v in sorted(metrics.items()) if _is_number(v)],
        "teacher_calls": handed_back.get("teacher_calls", []),
    }


def artifact_of(result: dict[str, Any]) -> Artifact:
    return Artifact(**result["artifact"])


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)
