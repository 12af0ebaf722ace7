"""Tokenizer stage: SentencePiece BPE trained on the prompts and targets of the corpus's train split, plus the
first `replay.tokenizer_chars` of the replay stream when the profile has one (a production vocabulary needs
more text than a channel corpus holds; the replay text is what the model will mostly read).

`tokenizer.kind: hf` (the adapter track) trains nothing: the artifact is the frozen base's own tokenizer files
(corpus.tokenizer.save_hf_tokenizer), keyed by their content (a local folder) or hub name + pinned revision."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from corpus.rows import read_rows
from tasks.common import artifact_of, logger, run_stage
from tinymars.profile import Profile


def replay_identity(profile: Profile) -> dict[str, Any] | None:
    """What of the replay source a stage reads: its content (files' hashes or hub name + pinned revision)."""
    if profile.replay is None:
        return None
    from corpus.replay import source_fingerprint

    r = profile.replay
    return {"content": source_fingerprint(r), "text_field": r.text_field}


@task(name="tokenizer", cache_policy=NO_CACHE)
def tokenizer_task(profile: Profile, home: str, corpus: dict[str, Any], force: bool = False) -> dict[str, Any]:
    corpus_art = artifact_of(corpus)
    replay = replay_identity(profile)
    section = profile.tokenizer.key()
    if replay is not None:
        section = {**section, "replay": {**replay, "chars": profile.replay.tokenizer_chars}}
    if profile.tokenizer.kind == "hf":
        return base_tokenizer(profile, home, corpus_art, section, force)

    def build(out: Path) -> dict[str, Any]:
        from corpus.tokenizer import Tokenizer, train_tokenizer, training_texts

        rows = read_rows(corpus_art.file("corpus.jsonl"))
        texts = training_texts(rows)  # the train split only: held-out text never shapes the vocabulary
        metrics: dict[str, Any] = {"training_texts": len(texts)}
        if replay is not None and profile.replay.tokenizer_chars > 0:
            from corpus.replay import sample_text, stream_texts

            sample = sample_text(stream_texts(profile.replay, Path(home) / "cache" / "datasets"),
                                 profile.replay.tokenizer_chars)
            logger().info(f"[tokenizer] + {sum(map(len, sample)):,} chars of replay text ({len(sample):,} sentences)")
            texts += sample
            metrics["replay_sentences"] = len(sample)
        tok = profile.tokenizer
        path = train_tokenizer(texts, out, tok.vocab_size, tok.model_type, tok.character_coverage)
        metrics["vocab_size"] = Tokenizer(path).vocab_size
        return {"meta": {"metrics": metrics}}

    return run_stage("tokenizer", home, section, {"corpus": corpus_art}, build, force)


def base_tokenizer(profile: Profile, home: str, corpus_art: Any, section: dict[str, Any],
                   force: bool) -> dict[str, Any]:
    """The `kind: hf` stage: copy the base's tokenizer into the artifact. The corpus stays an input so the
    lineage graph is the same shape for both kinds (and a corpus rebuild reaches pack the same way)."""
    from corpus.tokenizer import DEFAULT_SEPARATOR, hf_source_identity

    tok = profile.tokenizer
    section = {**section, "source": hf_source_identity(tok.base, tok.revision)}

    def build(out: Path) -> dict[str, Any]:
        from corpus.tokenizer import save_hf_tokenizer

        record = save_hf_tokenizer(tok.base, tok.revision, tok.separator or DEFAULT_SEPARATOR, out)
        logger().info(f"[tokenizer] the base's own tokenizer ({tok.base}): {record['vocab_size']:,} ids, "
                      f"separator {record['separator']!r}, no SentencePiece training")
        return {"meta": {"metrics": {"vocab_size": record["vocab_size"]},
                         "hf_tokenizer": {k: record[k] for k in ("base", "revision", "separator", "files")}}}

    return run_stage("tokenizer", home, section, {"corpus": corpus_art}, build, force)
