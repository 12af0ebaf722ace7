"""What every stage task shares: its code version, the cache decision, and the record it hands back.

Caching is ours, not Prefect's: a stage's key is its code version + its profile section + its
inputs' content hashes (tinymars.artifacts.stage_key), and a hit is only trusted after the
files re-hash to their manifest. Prefect's own result cache would return a manifest whose files
may have changed underneath it, so tasks run with NO_CACHE and decide here.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

from prefect import get_run_logger
from prefect.exceptions import MissingContextError

from tinymars.artifacts import Artifact, ArtifactStore, code_version, stage_key

ROOT = Path(__file__).resolve().parents[1]

# The source files each stage runs; editing one invalidates that stage (and, through content
# hashes, whatever its output change reaches downstream).
STAGE_SOURCES: dict[str, tuple[str, ...]] = {
    "corpus": ("corpus/template_teacher.py", "corpus/rows.py", "corpus/encode.py", "corpus/data", "tasks/corpus.py",
               "scorers/register.py", "scorers/selection.py", "scorers/text.py", "scorers/lexicons.json",
               "tinymars/domain.py"),
    "channels": ("corpus/channels.py", "corpus/encode.py", "corpus/embed.py", "tasks/channels.py",
                 "tinymars/domain.py"),
    "tokenizer": ("corpus/tokenizer.py", "tasks/tokenizer.py"),
    "pack": ("corpus/pack.py", "corpus/tokenizer.py", "tasks/pack.py"),
    "train": (
        "models/config.py", "models/gpt.py", "models/architectures.py", "models/data.py", "models/trainer.py",
        "models/adapter.py", "models/checkpoint.py", "models/weights.py", "models/distributed.py", "models/sizing.py",
        "models/launch.py", "models/train_cli.py", "tasks/train.py",
        "models/vocab_common.py", "models/vocab_graph.py", "models/vocab_conv.py", "tinymars/domain.py",
    ),
    "steer": ("corpus/concepts.py", "corpus/encode.py", "corpus/tokenizer.py", "models/activations.py",
              "models/steering.py", "models/adapter.py", "models/checkpoint.py", "models/weights.py",
              "models/config.py", "models/gpt.py", "models/architectures.py", "scorers/concept_quality.py",
              "tasks/steering.py", "tinymars/domain.py"),
    "eval": ("models", "scorers", "corpus/tokenizer.py", "corpus/encode.py", "corpus/concepts.py", "corpus/rows.py",
             "corpus/channels.py", "tasks/eval.py", "tinymars/domain.py"),
    "report": ("scorers", "tasks/report.py", "tasks/report_html.py", "tasks/report_plots.py", "tinymars/domain.py"),
}


@cache
def stage_code_version(stage: str) -> str:
    return code_version(ROOT / p for p in STAGE_SOURCES[stage])


def logger():
    try:
        return get_run_logger()
    except MissingContextError:  # called outside a flow (a notebook, a unit test)
        import logging

        return logging.getLogger("tinymars")


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
    key = stage_key(stage, stage_code_version(stage), section, input_hashes)
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
