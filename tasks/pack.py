"""Pack stage: parquet shards of token ids, loss masks and channel vectors (train and held-out)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from corpus.channels import load_channels
from corpus.rows import read_rows
from tasks.common import artifact_of, logger, run_stage, stage_progress
from tinymars.profile import Profile


@task(name="pack", cache_policy=NO_CACHE)
def pack_task(
    profile: Profile,
    home: str,
    corpus: dict[str, Any],
    channels: dict[str, Any],
    tokenizer: dict[str, Any],
    force: bool = False,
) -> dict[str, Any]:
    section = profile.pack
    inputs = {"corpus": artifact_of(corpus), "channels": artifact_of(channels), "tokenizer": artifact_of(tokenizer)}

    def build(out: Path) -> dict[str, Any]:
        from corpus.pack import pack_rows
        from corpus.tokenizer import load_tokenizer

        rows = read_rows(inputs["corpus"].file("corpus.jsonl"))
        mats = load_channels(Path(inputs["channels"].path))
        tok = load_tokenizer(inputs["tokenizer"].path)  # ours (SentencePiece) or a frozen base's (kind hf)
        with stage_progress("[pack] tokenising", len(rows), "rows") as progress:
            meta = pack_rows(rows, mats, tok, section.seq_len, section.rows_per_shard, out, progress)
        logger().info(
            f"[pack] {meta['rows']['train']} train / {meta['rows']['heldout']} held-out rows, "
            f"{meta['tokens']['train']:,} train tokens, {meta['truncated_rows']} truncated"
        )
        metrics = {"rows_train": meta["rows"]["train"], "rows_heldout": meta["rows"]["heldout"],
                   "tokens_train": meta["tokens"]["train"], "truncated_rows": meta["truncated_rows"]}
        return {"rows": sum(meta["rows"].values()), "meta": {"metrics": metrics, "pack": meta}}

    return run_stage("pack", home, profile.section("pack"), inputs, build, force)
