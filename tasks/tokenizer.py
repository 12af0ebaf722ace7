"""Tokenizer stage: SentencePiece BPE trained on the prompts and targets of the corpus's train split."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from corpus.rows import read_rows
from tasks.common import artifact_of, run_stage
from tinymars.profile import Profile


@task(name="tokenizer", cache_policy=NO_CACHE)
def tokenizer_task(profile: Profile, home: str, corpus: dict[str, Any], force: bool = False) -> dict[str, Any]:
    section = profile.tokenizer
    corpus_art = artifact_of(corpus)

    def build(out: Path) -> dict[str, Any]:
        from corpus.tokenizer import Tokenizer, train_tokenizer, training_texts

        rows = read_rows(corpus_art.file("corpus.jsonl"))
        texts = training_texts(rows)  # the train split only: held-out text never shapes the vocabulary
        path = train_tokenizer(texts, out, section.vocab_size, section.model_type, section.character_coverage)
        vocab = Tokenizer(path).vocab_size
        return {"meta": {"metrics": {"vocab_size": vocab, "training_texts": len(texts)}}}

    return run_stage("tokenizer", home, profile.section("tokenizer"), {"corpus": corpus_art}, build, force)
