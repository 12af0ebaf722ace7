"""Tokenizer and packer: real SentencePiece, real parquet, exact loss masks."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from corpus.pack import PackError, encode_row, pack_rows
from corpus.tokenizer import BOS, EOS, Tokenizer, TokenizerError, train_tokenizer

WORDS = ("morning sun coffee river piano beagle Lisbon sister thread memory warm cold night cautious "
         "permissive plan meeting report summary tomorrow weekend ideas").split()


def _texts(n: int = 300) -> list[str]:
    rng = np.random.default_rng(0)
    return [" ".join(rng.choice(WORDS, size=12)) + "." for _ in range(n)]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    return Tokenizer(train_tokenizer(_texts(), out, vocab_size=320))


def _rows():
    rows = []
    for i, split in enumerate(["train", "train", "heldout", "heldout"]):
        rows.append({"row_id": f"aff-{i}-+", "prompt_id": f"aff-{i}", "capability": "affect", "kind": "register",
                     "split": split, "prompt": "Can you summarise the plan for tomorrow?",
                     "target": "Warm morning coffee by the river.", "channel_state": {}})
    rows.append({"row_id": "aff-c-0", "prompt_id": "aff-c-0", "capability": "affect", "kind": "conflict",
                 "split": "heldout", "prompt": "cold night", "target": "warm", "channel_state": {}})
    return rows


def test_training_is_deterministic_and_has_special_pieces(tmp_path, tok):
    a = train_tokenizer(_texts(), tmp_path, vocab_size=320)
    other = tmp_path / "again"
    other.mkdir()
    b = train_tokenizer(_texts(), other, vocab_size=320)
    assert a.read_bytes() == b.read_bytes(), "same texts must give a byte-identical model (cache stability)"
    assert tok.vocab_size == 320 and tok.target_id == 4
    ids = tok.prompt_ids("Warm morning coffee")
    assert ids[0] == BOS and ids[-1] == tok.target_id
    assert tok.decode(tok.encode("Warm morning coffee.")) == "Warm morning coffee."


def test_vocab_too_large_names_the_field(tmp_path):
    with pytest.raises(TokenizerError, match=r"tokenizer.vocab_size: 50000 is larger than this corpus supports"):
        train_tokenizer(_texts(50), tmp_path, vocab_size=50000)


def test_empty_corpus_is_a_clear_error(tmp_path):
    with pytest.raises(TokenizerError, match="no text"):
        train_tokenizer(["", "  "], tmp_path, vocab_size=300)


def test_encode_row_masks_exactly_the_target(tok):
    ids, mask, cut = encode_row(tok, "plan for tomorrow", "warm coffee", seq_len=64)
    n_prompt = len(tok.prompt_ids("plan for tomorrow"))
    assert not cut
    assert mask == [0] * n_prompt + [1] * (len(ids) - n_prompt)
    assert ids[-1] == EOS and tok.decode(ids[n_prompt:]) == "warm coffee"
    ids, mask, cut = encode_row(tok, "plan", "warm coffee " * 50, seq_len=20)
    assert cut and len(ids) == 21 and len(mask) == 21
    with pytest.raises(PackError, match="pack.seq_len: 4 is too short"):
        encode_row(tok, "plan for tomorrow and the weekend", "x", seq_len=4)


def test_pack_writes_schema_splits_and_channels(tmp_path, tok):
    rows = _rows()
    mats = {"affect": np.arange(10, dtype=np.float32).reshape(5, 2), "time": np.ones((5, 16), np.float32)}
    meta = pack_rows(rows, mats, tok, seq_len=64, rows_per_shard=1, out_dir=tmp_path)
    assert meta["rows"] == {"train": 2, "heldout": 2}, "conflict rows are eval-only"
    assert meta["channel_names"] == ["affect", "time"] and meta["channel_dim"] == 16
    assert meta["shards"]["train"] == ["train-00000.parquet", "train-00001.parquet"]
    t = pq.read_table(tmp_path / "train-00001.parquet").to_pylist()[0]
    assert t["row_id"] == "aff-1-+"
    ch = np.array(t["channels"], dtype=np.float32).reshape(2, 16)
    assert ch[0, :2].tolist() == [2.0, 3.0] and ch[0, 2:].sum() == 0 and ch[1].tolist() == [1.0] * 16
    assert len(t["input_ids"]) == len(t["loss_mask"]) and t["target_bytes"] == len(rows[1]["target"].encode())
    assert json.loads((tmp_path / "pack.json").read_text()) == meta


def test_pack_refuses_a_corpus_without_heldout(tmp_path, tok):
    rows = [r for r in _rows() if r["split"] == "train"]
    with pytest.raises(PackError, match="no held-out rows"):
        pack_rows(rows, {"affect": np.zeros((2, 2), np.float32)}, tok, 64, 10, tmp_path)
