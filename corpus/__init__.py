"""Corpus v2: template teacher, channel encoders, embedder, tokenizer and packing (no Prefect)."""
