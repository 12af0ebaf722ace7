"""Corpus stage: teacher-generated counterfactual rows (corpus v2), split by prompt."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.common import logger, run_stage
from tinymars.profile import Profile


def read_rows(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@task(name="corpus", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=5)
def corpus_task(profile: Profile, home: str, force: bool = False) -> dict[str, Any]:
    section = profile.corpus

    def build(out: Path) -> dict[str, Any]:
        if section.teacher.kind != "template":
            raise NotImplementedError("only the offline template teacher is implemented in this version")
        from corpus.template_teacher import generate_corpus

        rows, stats = generate_corpus(
            capabilities=list(section.capabilities),
            prompts_per_capability=section.prompts_per_capability,
            conflict_prompts_per_capability=section.conflict_prompts_per_capability,
            heldout_fraction=section.heldout_fraction,
            seed=section.seed,
        )
        if not rows:
            raise ValueError("corpus: the teacher produced no rows; raise corpus.prompts_per_capability")
        with open(out / "corpus.jsonl", "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")
        (out / "stats.json").write_text(json.dumps(stats, indent=1, sort_keys=True))
        splits = Counter(r["split"] for r in rows)
        rejected = sum(stats.get("rejected", {}).values()) if isinstance(stats.get("rejected"), dict) else 0
        logger().info(
            f"[corpus] {len(rows)} rows ({splits['train']} train, {splits['heldout']} held-out), "
            f"{rejected} rejected by pre-flight"
        )
        metrics = {"rows": len(rows), "rows_train": splits["train"], "rows_heldout": splits["heldout"],
                   "rejected": rejected}
        return {"rows": len(rows), "meta": {"metrics": metrics, "stats": stats}}

    return run_stage("corpus", home, profile.section("corpus"), {}, build, force)
