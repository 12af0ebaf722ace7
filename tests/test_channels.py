"""Channels stage domain code with the real offline MiniLM embedder."""

from __future__ import annotations

import numpy as np
import pytest

from corpus.channels import ChannelError, channel_matrices
from corpus.embed import EmbedderError, embed_texts, embedding_dim, load_embedder
from corpus.template_teacher import generate_corpus

DIMS = {"memory": 384, "identity": 384, "continuity": 384, "affect": 2, "time": 16, "ethics": 24}


def test_minilm_loads_offline_and_embeds(minilm):
    assert embedding_dim(minilm) == 384
    v = embed_texts(minilm, ["a beagle called Rex", "a beagle called Rex", "tax forms"])
    assert v.shape == (3, 384) and v.dtype == np.float32
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert np.array_equal(v[0], v[1]) and not np.allclose(v[0], v[2])


def test_each_distinct_text_is_embedded_once(minilm):
    rows, _ = generate_corpus(list(DIMS), 4, 1, 0.25, seed=1)
    calls: list[list[str]] = []

    def embed(texts: list[str]) -> np.ndarray:
        calls.append(texts)
        return embed_texts(minilm, texts)

    mats, counts = channel_matrices(rows, DIMS, embed)
    assert len(calls) == 1, "one batched embedding call for the whole corpus"
    assert len(calls[0]) == len(set(calls[0])) == counts["distinct_texts"]
    assert counts["text_slots"] == sum(1 for r in rows for c in r["channel_state"] if c in ("memory", "identity",
                                                                                             "continuity"))
    for i, row in enumerate(rows):
        (cap,) = row["channel_state"]
        for name, m in mats.items():
            assert m.shape == (len(rows), DIMS[name])
            assert (np.abs(m[i]).sum() > 0) == (name == cap), f"{row['row_id']}: only its own channel is set"
    # the three rows of one selection prompt carry three different memory vectors
    mem = [i for i, r in enumerate(rows) if r["prompt_id"] == rows[0]["prompt_id"]]
    assert len({mats["memory"][i].tobytes() for i in mem}) == 3


def test_dimension_mismatch_names_the_field(minilm):
    rows, _ = generate_corpus(["memory"], 2, 0, 0.5, seed=1)
    with pytest.raises(ChannelError, match=r"channels.enabled.memory.dim: 100 but the embedder gives 384-d"):
        channel_matrices(rows, {"memory": 100}, lambda t: embed_texts(minilm, t))


def test_non_finite_numeric_state_is_refused():
    rows, _ = generate_corpus(["affect"], 2, 0, 0.5, seed=1)
    rows[0]["channel_state"]["affect"]["valence"] = float("nan")
    with pytest.raises(ChannelError, match=r"row aff-\S+: bad affect channel state: .*valence.*got nan"):
        channel_matrices(rows, {"affect": 2}, lambda t: None)


def test_unknown_hub_name_fails_clearly_offline():
    with pytest.raises(EmbedderError, match="channels.embedder.model 'no-such-org/no-such-model'"):
        load_embedder("no-such-org/no-such-model")
