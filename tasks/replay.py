"""Replay stage: the replay stream tokenised with the run's tokenizer into token shards (corpus.replay).

Keyed by the tokenizer's hash and the source's identity (local files' hashes, or hub name + pinned
revision), so the ~1B production tokens are read and tokenised once and shared by every model and rerun.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.common import artifact_of, logger, run_stage, stage_progress
from tasks.tokenizer import replay_identity
from tinymars.profile import Profile


@task(name="replay", cache_policy=NO_CACHE)
def replay_task(profile: Profile, home: str, tokenizer: dict[str, Any], force: bool = False) -> dict[str, Any]:
    r = profile.replay
    tok_art = artifact_of(tokenizer)
    section = {**profile.section("replay"), "content": replay_identity(profile)["content"]}
    for volatile in ("workers", "tokenizer_chars", "share"):  # speed, the tokenizer's sample, the trainer's mix
        section.pop(volatile)

    def build(out: Path) -> dict[str, Any]:
        from corpus.replay import resolve_workers, stream_texts, write_shards
        from corpus.tokenizer import Tokenizer

        log = logger()
        workers = resolve_workers(r.workers)
        vocab = Tokenizer(tok_art.file("tokenizer.model")).vocab_size
        t0, last = time.perf_counter(), [0.0]

        def progress(done: int, wanted: int) -> None:
            bar(done, wanted)
            now = time.perf_counter() - t0
            if now - last[0] >= 10 or done >= wanted:
                last[0] = now
                rate = done / max(now, 1e-9)
                eta = (wanted - done) / rate if rate else float("inf")
                log.info(f"[replay] {done:,}/{wanted:,} tokens ({100 * done / wanted:.1f}%), "
                         f"{rate:,.0f} tok/s, ETA {eta:,.0f} s")

        log.info(f"[replay] tokenising '{r.source}'" + (f"@{r.revision[:12]}" if r.revision else "")
                 + f" with {workers} worker(s) up to {r.tokens:,} tokens")
        with stage_progress("[replay] tokenising", r.tokens, "tok") as bar:
            manifest = write_shards(stream_texts(r, Path(home) / "cache" / "datasets"),
                                    tok_art.file("tokenizer.model"), vocab, r.tokens, r.shard_tokens, out, workers,
                                    progress)
        if manifest["exhausted"]:
            log.warning(f"[replay] the source ran out at {manifest['tokens']:,} of {r.tokens:,} tokens: training "
                        "repeats it (the report and validate count replay epochs); lower replay.tokens or use a "
                        "larger source")
        metrics = {k: manifest[k] for k in ("tokens", "documents", "chars_read")}
        metrics["shards"] = len(manifest["shards"])
        return {"meta": {"metrics": metrics, "replay": manifest}}

    return run_stage("replay", home, section, {"tokenizer": tok_art}, build, force)
