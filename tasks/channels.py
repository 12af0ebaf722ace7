"""Channels stage: every row's channel state as vectors (text channels embedded, each text once)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from prefect import task
from prefect.cache_policies import NO_CACHE
from safetensors.torch import save_file

from corpus.rows import read_rows
from models.distributed import resolve_device
from tasks.common import artifact_of, logger, run_stage, stage_progress
from tinymars.domain import TEXT_CHANNELS
from tinymars.profile import Profile


@task(name="channels", cache_policy=NO_CACHE, retries=1)
def channels_task(profile: Profile, home: str, corpus: dict[str, Any], force: bool = False) -> dict[str, Any]:
    section = profile.channels
    corpus_art = artifact_of(corpus)

    def build(out: Path) -> dict[str, Any]:
        from corpus.channels import channel_matrices
        from corpus.embed import embed_texts, load_embedder

        rows = read_rows(corpus_art.file("corpus.jsonl"))
        dims = {name: spec.dim for name, spec in section.enabled.items()}
        model = None

        def embed(texts: list[str]):
            nonlocal model
            log = logger()
            device = resolve_device(section.embedder.device)
            log.info(f"[channels] loading embedder {section.embedder.model} on {device}")
            model = load_embedder(section.embedder.model, device)
            with stage_progress("[channels] embedding", len(texts), "texts") as progress:
                return embed_texts(model, texts, section.embedder.batch_size, progress)

        needs_text = any(n in TEXT_CHANNELS for n in dims)
        mats, counts = channel_matrices(
            rows, dims, embed if needs_text else (lambda t: None), progress=lambda m: logger().info(f"[channels] {m}")
        )
        save_file({k: torch.from_numpy(v) for k, v in mats.items()}, str(out / "channels.safetensors"))
        info = {"names": list(dims), "dims": dims, "embedder": section.embedder.model, "rows": len(rows), **counts}
        (out / "channels.json").write_text(json.dumps(info, indent=1, sort_keys=True))
        return {"rows": len(rows), "meta": {"metrics": counts, "names": list(dims), "dims": dims}}

    return run_stage("channels", home, profile.section("channels"), {"corpus": corpus_art}, build, force)

