"""Replay mix: general text from a `datasets` source (local jsonl / parquet / text here), mixed into the
train split at the profile's ratio, deterministic, and accepted by the channels and pack stages."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from corpus.channels import channel_matrices
from corpus.pack import pack_rows
from corpus.replay import ReplayError, clip, load_texts, replay_rows
from corpus.rows import ROW_FIELDS, read_rows
from corpus.template_teacher import generate_corpus
from corpus.tokenizer import Tokenizer, train_tokenizer
from tasks.corpus import corpus_task, key_section
from tinymars.domain import CAPABILITIES
from tinymars.profile import ProfileError, load_profile

TEXTS = [f"General passage number {i} talks about rivers, bread and the weather in spring {i}." for i in range(30)]


@pytest.fixture
def sources(tmp_path):
    jsonl = tmp_path / "replay.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(TEXTS)) + "\n")
    parquet = tmp_path / "replay.parquet"
    pq.write_table(pa.table({"text": TEXTS}), parquet)
    txt = tmp_path / "replay.txt"
    txt.write_text("\n".join(TEXTS) + "\n\n")
    return {"jsonl": jsonl, "parquet": parquet, "txt": txt}


def test_local_sources_read_the_same_texts(sources, tmp_path):
    for path in sources.values():
        assert load_texts(str(path), None, "train", "text", tmp_path / "cache") == TEXTS


def test_replay_rows_are_deterministic_train_rows_at_the_ratio(sources, tmp_path):
    texts = load_texts(str(sources["jsonl"]), None, "train", "text", tmp_path / "cache")
    rows, stats = replay_rows(texts, train_rows=40, ratio=0.25, max_chars=40, seed=1)
    assert len(rows) == 10 and stats == {"wanted": 10, "rows": 10, "available": 30,
                                         "chars": sum(len(r["target"]) for r in rows)}
    assert all(list(r) == list(ROW_FIELDS) for r in rows)
    assert {(r["capability"], r["kind"], r["split"], r["prompt"]) for r in rows} == {("replay", "replay", "train", "")}
    assert all(r["channel_state"] == {} and len(r["target"]) <= 40 for r in rows)
    assert all(any(t.startswith(r["target"]) for t in texts) for r in rows)
    assert replay_rows(texts, 40, 0.25, 40, seed=1)[0] == rows
    assert [r["target"] for r in replay_rows(texts, 40, 0.25, 40, seed=2)[0]] != [r["target"] for r in rows]
    few, few_stats = replay_rows(texts, 100, 1.0, 40, seed=1)
    assert len(few) == 30 and few_stats["wanted"] == 100


def test_clip_cuts_at_a_word_boundary():
    assert clip("one two three", 100) == "one two three"
    assert clip("one two three", 9) == "one two"
    assert clip("abcdefghij", 4) == "abcd"


def test_bad_sources_name_the_field(sources, tmp_path):
    with pytest.raises(ReplayError, match="corpus.replay.text_field: 'body' is not a column"):
        load_texts(str(sources["jsonl"]), None, "train", "body", tmp_path / "c")
    odd = tmp_path / "data.xml"
    odd.write_text("<x/>")
    with pytest.raises(ReplayError, match="unknown suffix"):
        load_texts(str(odd), None, "train", "text", tmp_path / "c")
    from app.common import preflight

    with pytest.raises(ProfileError, match="corpus.replay.source: local path './missing.jsonl' does not exist"):
        preflight("tiny", ["corpus.replay={source: ./missing.jsonl}"], [])


def test_replay_rows_pass_through_channels_and_pack(sources, tmp_path):
    corpus, _ = generate_corpus(list(CAPABILITIES), 2, 0, 0.25, seed=1)
    extra, _ = replay_rows(TEXTS, sum(r["split"] == "train" for r in corpus), 0.5, 200, seed=1)
    rows = corpus + extra
    mats, _ = channel_matrices(rows, {"affect": 2, "time": 16}, embed=lambda texts: None)
    assert not np.any(mats["affect"][len(corpus):]) and not np.any(mats["time"][len(corpus):])
    tok = Tokenizer(train_tokenizer([t for r in rows for t in (r["prompt"], r["target"])], tmp_path, 600))
    meta = pack_rows(rows, mats, tok, seq_len=192, rows_per_shard=1000, out_dir=tmp_path)
    assert meta["rows"]["train"] == sum(r["split"] == "train" for r in rows)
    table = pq.read_table(tmp_path / "train-00000.parquet").to_pylist()
    replayed = [r for r in table if r["capability"] == "replay"]
    assert len(replayed) == len(extra) and all(sum(r["loss_mask"]) > 1 for r in replayed)


def test_corpus_stage_mixes_replay_in_and_keys_on_its_content(sources, tmp_path):
    overrides = [f"corpus.replay={{source: {sources['jsonl']}, ratio: 0.2}}"]
    prof = load_profile("tiny", overrides)
    result = corpus_task.fn(prof, str(tmp_path / "home"))
    rows = read_rows(tmp_path / "home" / "artifacts" / "corpus" / result["key"] / "corpus.jsonl")
    train = [r for r in rows if r["split"] == "train" and r["capability"] != "replay"]
    replayed = [r for r in rows if r["capability"] == "replay"]
    assert len(replayed) == round(0.2 * len(train)) > 0
    assert result["artifact"]["meta"]["stats"]["replay"]["rows"] == len(replayed)
    before = key_section(prof)["replay_content"]
    sources["jsonl"].write_text(sources["jsonl"].read_text() + json.dumps({"text": "one more passage"}) + "\n")
    assert key_section(prof)["replay_content"] != before  # new source content, new corpus
