"""Language-model replay (issue 14): a `datasets` stream (local jsonl / parquet / text here; a pinned hub
revision in production) tokenised in parallel into shards, cut into whole windows whose attention stays
inside each document, and mixed into training at the profile's share of the windows."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from test_models import NAMES, D, V
from test_packing import T, random_rows, scrambled

from corpus.offline_text import write_prose_jsonl
from corpus.replay import sample_text, stream_texts, write_shards
from corpus.tokenizer import BOS, EOS, Tokenizer, train_tokenizer
from models.data import PAD_ROW, ReplayWindows, TrainBatches, mixed_source, tiling
from models.gpt import Window
from tinymars.artifacts import sha256_file
from tinymars.profile import ReplaySection, load_profile

TEXTS = [f"General passage number {i} talks about rivers, bread and the weather in spring {i}." for i in range(30)]


def section(source, **kw) -> ReplaySection:
    return ReplaySection(source=str(source), tokens=kw.pop("tokens", 5000), share=kw.pop("share", 0.5), **kw)


@pytest.fixture
def sources(tmp_path):
    jsonl = tmp_path / "replay.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(TEXTS)) + "\n")
    parquet = tmp_path / "replay.parquet"
    pq.write_table(pa.table({"text": TEXTS}), parquet)
    txt = tmp_path / "replay.txt"
    txt.write_text("\n".join(TEXTS) + "\n\n")
    folder = tmp_path / "folder"
    folder.mkdir()
    pq.write_table(pa.table({"text": TEXTS[:15]}), folder / "a.parquet")
    pq.write_table(pa.table({"text": TEXTS[15:]}), folder / "b.parquet")
    return {"jsonl": jsonl, "parquet": parquet, "txt": txt, "folder": folder}


@pytest.fixture(scope="module")
def prose(tmp_path_factory):
    """~150k chars of real English prose (stdlib docstrings) and a 600-piece tokenizer trained on it."""
    root = tmp_path_factory.mktemp("prose")
    write_prose_jsonl(root / "prose.jsonl", 150_000)
    texts = sample_text(stream_texts(section(root / "prose.jsonl"), root / "cache"), 150_000)
    return {"path": root / "prose.jsonl", "tokenizer": train_tokenizer(texts, root, 600), "root": root}


def test_local_sources_stream_the_same_texts(sources, tmp_path):
    for path in sources.values():
        assert list(stream_texts(section(path), tmp_path / "cache")) == TEXTS


def test_sentences_for_the_tokenizer_are_cut_short_enough(tmp_path):
    long = " ".join(["word"] * 2000)  # SentencePiece silently drops training sentences over 4192 bytes
    out = sample_text([long, "short one"], chars=100_000)
    assert max(map(len, out)) <= 2000 and " ".join(out[:-1]).split() == long.split() and out[-1] == "short one"
    assert sum(map(len, sample_text([long], chars=3000))) <= 3000


def test_shards_hold_whole_documents_in_source_order_whatever_the_workers(prose, tmp_path):
    texts = list(stream_texts(section(prose["path"]), tmp_path / "cache"))
    tok = Tokenizer(prose["tokenizer"])
    one = write_shards(texts, prose["tokenizer"], tok.vocab_size, 30_000, 8_000, tmp_path / "one", workers=1)
    two = write_shards(texts, prose["tokenizer"], tok.vocab_size, 30_000, 8_000, tmp_path / "two", workers=2)
    assert [s["sha256"] for s in one["shards"]] == [s["sha256"] for s in two["shards"]]  # same bytes, any workers
    assert one["tokens"] == 30_000 and not one["exhausted"] and len(one["shards"]) == 4
    for s in one["shards"]:
        assert sha256_file(tmp_path / "one" / s["file"]) == s["sha256"]
    stream = np.concatenate([np.load(tmp_path / "one" / s["file"]) for s in one["shards"]])
    assert stream.dtype == np.uint16 and len(stream) == 30_000
    starts = np.flatnonzero(stream == BOS)
    docs = np.split(stream, starts[1:])
    assert starts[0] == 0 and len(docs) == one["documents"]
    for doc, text in zip(docs[:-1], texts, strict=False):  # the last document is cut at `tokens`
        assert doc[-1] == EOS  # SentencePiece folds runs of whitespace (newlines) into one space:
        assert tok.decode(doc[1:-1].tolist()).split() == text.split()
    short = write_shards(texts[:3], prose["tokenizer"], tok.vocab_size, 30_000, 8_000, tmp_path / "short")
    assert short["exhausted"] and short["documents"] == 3


def test_replay_windows_keep_attention_and_positions_inside_each_document(prose, tmp_path):
    tok = Tokenizer(prose["tokenizer"])
    texts = stream_texts(section(prose["path"]), tmp_path / "cache")
    manifest = write_shards(texts, prose["tokenizer"], tok.vocab_size, 20_000, 6_000, tmp_path / "s")
    replay = ReplayWindows(tmp_path / "s", manifest, T, BOS, seed=1)
    assert len(replay) == sum((s["tokens"] - 1) // T for s in manifest["shards"])
    chunks = {replay.tokens(r).tobytes() for r in range(len(replay))}  # an epoch visits every chunk once:
    stream = np.concatenate([np.load(tmp_path / "s" / s["file"]) for s in manifest["shards"]]).astype(np.int64)
    per_shard = [(s["tokens"] - 1) // T for s in manifest["shards"]]
    offsets = np.cumsum([0] + [s["tokens"] for s in manifest["shards"]])
    expected = {stream[o + c * T:o + c * T + T + 1].tobytes() for o, n in zip(offsets, per_shard, strict=False)
                for c in range(n)}
    assert chunks == expected
    assert [replay.tokens(r)[:8].tolist() for r in range(3)] != [replay.tokens(len(replay) + r)[:8].tolist()
                                                                 for r in range(3)]  # epochs reshuffle
    picked = [r for r in range(len(replay)) if (replay.tokens(r)[1:-1] == BOS).any()][:3]  # a document starts inside
    b = replay.batch(picked, (3, len(NAMES), D), tiles=2)
    idx, row_ids, positions = b["idx"], b["row_ids"], b["positions"]
    for w in range(3):
        starts = [s for s in (idx[w] == BOS).nonzero().flatten().tolist() if s > 0]
        for s in starts:
            assert positions[w, s] == 0 and positions[w, s - 1] > 0 and row_ids[w, s] == row_ids[w, s - 1] + 1
        assert torch.equal(positions[w, 1:starts[0]], torch.arange(1, starts[0]) + positions[w, 0])
        assert torch.equal(b["loss_mask"][w].bool(), b["targets"][w] != BOS)  # never predict the next bos
    assert (b["row_tiles"] == PAD_ROW).all() and b["row_tiles"].shape == (3, tiling(T)[0], 2)
    assert not b["channels"].any() and b["channels"].shape == (3, 3, len(NAMES), D)

    model = scrambled("native")  # changing one document leaves every other document's logits bit-identical
    vocab_ids = {"idx": b["idx"] % V, **{k: v for k, v in b.items() if k != "idx"}}
    with torch.no_grad():
        base = model(vocab_ids["idx"], vocab_ids["channels"], window=Window.of(vocab_ids))[0]
        first = row_ids[0] == row_ids[0, 0]
        changed = vocab_ids["idx"].clone()
        changed[0, first] = (changed[0, first] + 1) % V
        out = model(changed, vocab_ids["channels"], window=Window.of(vocab_ids))[0]
    assert torch.equal(out[0, ~first], base[0, ~first]) and not torch.equal(out[0, first], base[0, first])


@pytest.mark.parametrize("share", [0.99, 0.5, 0.25])
def test_corpus_windows_are_spread_evenly_at_the_share(share):
    corpus = [not mixed_source(w, share)[0] for w in range(4000)]
    for n in (1, 7, 100, 999, 4000):  # every prefix holds floor(n (1 - share)) corpus windows
        assert sum(corpus[:n]) == int(n * (1 - share) + 1e-9)
    indices = [mixed_source(w, share)[1] for w in range(4000)]
    assert [i for i, c in zip(indices, corpus, strict=True) if c] == list(range(sum(corpus)))  # each source in order
    assert [i for i, c in zip(indices, corpus, strict=True) if not c] == list(range(4000 - sum(corpus)))


def test_training_batches_mix_replay_windows_in_stream_order(prose, tmp_path):
    tok = Tokenizer(prose["tokenizer"])
    manifest = write_shards(stream_texts(section(prose["path"]), tmp_path / "cache"), prose["tokenizer"],
                            tok.vocab_size, 20_000, 20_000, tmp_path / "s")
    rows = random_rows(60, seed=3)
    replay = ReplayWindows(tmp_path / "s", manifest, T, BOS, seed=1)
    mixed = TrainBatches(rows, T, 0, seed=1, packed=True, replay=replay, replay_share=0.75)
    alone = TrainBatches(rows, T, 0, seed=1, packed=True)
    units = mixed.units(step=3, batch_size=8)
    kinds = [isinstance(u, int) for u in units]
    assert sum(kinds) == 6  # windows 24..31 at a 0.75 share
    batch = mixed.make(units)
    corpus_part = alone.make(alone.stream.windows(6, 2))  # corpus windows 6 and 7 of the stream
    assert torch.equal(batch["idx"][[i for i, k in enumerate(kinds) if not k]], corpus_part["idx"])
    assert torch.equal(batch["idx"][kinds.index(True)], torch.from_numpy(replay.tokens(units[kinds.index(True)])[:-1]))
    assert mixed.real_tokens(units) == 6 * T + alone.real_tokens(alone.stream.windows(6, 2))
    with pytest.raises(ValueError, match="replay needs packed training"):
        TrainBatches(rows, T, 0, seed=1, packed=False, replay=replay, replay_share=0.5)


def test_a_hub_source_must_be_pinned_and_the_old_section_says_where_it_went():
    with pytest.raises(Exception, match="needs a pinned revision"):
        load_profile("tiny", ["replay={source: HuggingFaceFW/fineweb-edu, tokens: 5000, share: 0.5}"])
    pinned = load_profile("tiny", ["replay={source: HuggingFaceFW/fineweb-edu, tokens: 5000, share: 0.5, "
                                   "revision: 87f09149ef4734204d70ed1d046ddc9ca3f2b8f9}"])
    assert pinned.replay.revision.startswith("87f0")
    with pytest.raises(Exception, match="corpus.replay moved to a top-level `replay:` section"):
        load_profile("tiny", ["corpus.replay={source: x.jsonl}"])
