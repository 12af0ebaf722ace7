"""The check before paying (corpus.budget): vocabulary support and the token budget, against SentencePiece
itself and hand arithmetic; validation refuses what the run would meet after spending."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from app.cli import main
from corpus.budget import TextVolume, budget_problems, chars_per_token, supportable_pieces, token_budget
from corpus.template_teacher import generate_corpus
from corpus.tokenizer import Tokenizer, TokenizerError, train_tokenizer, training_texts
from tinymars.profile import load_profile

ROOT = Path(__file__).resolve().parents[1]


def sentencepiece_most(texts: list[str], tmp_path: Path, model_type: str = "bpe") -> int:
    """The most pieces SentencePiece accepts for `texts`: its own 'at most N' for an impossible size."""
    with pytest.raises(TokenizerError) as err:
        train_tokenizer(texts, tmp_path, 262144, model_type)
    return int(re.search(r"at most (\d+)", str(err.value)).group(1))


def template_texts(prompts: int, seed: int) -> list[str]:
    rows, _ = generate_corpus(["memory", "identity", "continuity", "affect", "time", "ethics"], prompts, 4, 0.25, seed)
    return training_texts(rows)


def prose_texts() -> list[str]:
    """English prose not used in the fit's template corpora: this project's own docs, one paragraph a text."""
    paras = []
    for name in ("README.md", "ARCHITECTURE.md", "docs/methods.md"):
        for p in (ROOT / name).read_text(encoding="utf-8").split("\n\n"):
            p = " ".join(p.split())
            if len(p) > 80 and not p.startswith(("```", "|", "<")):
                paras.append(p[:1200])
    return paras


@pytest.mark.parametrize(("source", "tolerance"), [("template", 0.12), ("prose", 0.25)])
def test_supportable_pieces_match_sentencepiece(source, tolerance, tmp_path):
    texts = template_texts(15, seed=11) if source == "template" else prose_texts()
    real = sentencepiece_most(texts, tmp_path)
    estimate = supportable_pieces(texts)
    assert abs(estimate - real) / real < tolerance, (estimate, real)


def test_more_text_supports_more_pieces(tmp_path):
    small, large = template_texts(6, seed=2), template_texts(40, seed=2)
    assert sentencepiece_most(small, tmp_path) < sentencepiece_most(large, tmp_path)
    assert supportable_pieces(small) < supportable_pieces(large)
    assert supportable_pieces(small, prose_chars=200_000) > supportable_pieces(small)  # replay adds pieces


def test_chars_per_token_matches_a_trained_tokenizer(tmp_path):
    texts = template_texts(30, seed=5)
    most = supportable_pieces(texts)
    for vocab in (800, 2000):
        tok = Tokenizer(train_tokenizer(texts, tmp_path, vocab))
        real = sum(map(len, texts)) / sum(len(tok.encode(t)) for t in texts)
        assert abs(chars_per_token(vocab, most) - real) / real < 0.15, (vocab, real)


def test_epochs_are_training_tokens_over_corpus_tokens():
    prof = load_profile("smoke", ["train.steps=100", "train.batch_size=2", "pack.seq_len=512"])
    vols = {"memory": TextVolume(rows=10, chars=4000, texts=["a b c"]), "ethics": TextVolume(rows=5, chars=6000)}
    b = token_budget(prof, vols)
    cpt = b["chars_per_token"]
    tokens = round(4000 / cpt) + 3 * 10 + round(6000 / cpt) + 3 * 5  # + [bos] <target> [eos] per row
    assert b["epoch_tokens"] == pytest.approx(tokens, abs=2)  # chars_per_token is shown rounded
    assert b["train_tokens"] == b["corpus_tokens"] == round(100 * 2 * 512 * 0.95)
    assert b["epochs"] == pytest.approx(100 * 2 * 512 * 0.95 / b["epoch_tokens"])
    unpacked = token_budget(load_profile("smoke", ["train.steps=100", "train.packing=false"]), vols)
    assert unpacked["epochs"] == pytest.approx(100 * 4 / 15)  # rows, one per sequence


def test_replay_takes_its_share_of_the_windows(tmp_path):
    source = tmp_path / "prose.jsonl"
    source.write_text('{"text": "words"}\n')
    replay = f"replay={{source: {source}, tokens: 100000, share: 0.75, tokenizer_chars: 300000}}"
    prof = load_profile("smoke", ["train.steps=100", "train.batch_size=4", "pack.seq_len=512", replay])
    vols = {"memory": TextVolume(rows=10, chars=4000, texts=["a b c"])}
    b, alone = token_budget(prof, vols), token_budget(load_profile("smoke", ["train.steps=100",
                                                                               "train.batch_size=4",
                                                                               "pack.seq_len=512"]), vols)
    assert b["replay"]["train_tokens"] == 100 * 4 * 512 * 0.75  # replay windows: every position is a token
    assert b["replay"]["epochs"] == pytest.approx(100 * 4 * 512 * 0.75 / 100000)
    assert b["corpus_tokens"] == round(100 * 4 * 0.25 * 512 * 0.95)
    assert b["epochs"] == pytest.approx(b["corpus_tokens"] / b["epoch_tokens"])
    assert b["supportable_pieces"] > alone["supportable_pieces"]  # the tokenizer reads the replay prose too


def test_validate_prints_the_budget(capsys):
    assert main(["validate", "--profile", "smoke"]) == 0
    out = capsys.readouterr().out
    b = token_budget(load_profile("smoke"))
    assert f"{b['epochs']:.1f} epochs of the channel corpus" in out
    for cap in ("memory", "ethics"):
        assert f"~{b['sources'][cap]['tokens']:>11,} tokens per epoch" in out
    assert "limit train.max_corpus_epochs 16" in out and 1 < b["epochs"] < 16


def test_too_many_epochs_is_refused_with_the_fix(capsys):
    assert main(["validate", "--profile", "smoke", "--set", "train.steps=3000"]) == 2
    err = capsys.readouterr().err
    assert "more than train.max_corpus_epochs 16" in err
    assert "lower train.steps or train.batch_size, add a replay section (replay: source, tokens, share), or raise "\
        "train.max_corpus_epochs" in err
    assert main(["validate", "--profile", "smoke", "--set", "train.steps=3000",
                 "--set", "train.max_corpus_epochs=100"]) == 0


def test_a_vocabulary_the_text_cannot_support_is_refused(capsys):
    assert main(["validate", "--profile", "smoke", "--set", "tokenizer.vocab_size=32000"]) == 2
    err = capsys.readouterr().err
    assert "tokenizer.vocab_size: 32000 is more than this corpus's text can support" in err
    assert "lower tokenizer.vocab_size" in err and "add a replay section" in err
    assert main(["cost", "--estimate", "--profile", "smoke", "--set", "tokenizer.vocab_size=32000"]) == 2


def test_iter7_as_shipped_passes_on_its_replay_stream():
    # the production shape (32k BPE, ~1B tokens): the channel corpus alone supports ~7.7k pieces and ~0.75M train
    # tokens; the pinned replay stream supplies the prose for the vocabulary and 99% of the windows
    prof = load_profile("iter7")
    b = token_budget(prof)
    assert budget_problems(b) == []
    assert 0.9e9 < b["train_tokens"] < 1.1e9  # the reference's ~1B tokens
    assert 4 <= b["epochs"] <= prof.train.max_corpus_epochs
    assert b["replay"]["epochs"] <= 1.0  # the replay text is read at most once
    assert b["sources"]["memory"]["rows"] > 1000
    without = token_budget(load_profile("iter7", ["replay=null"]))
    problems = "\n".join(budget_problems(without))
    assert "tokenizer.vocab_size: 32000" in problems and "train.max_corpus_epochs" in problems
