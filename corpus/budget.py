"""What a profile's corpus will hold and what training will ask of it, from the profile alone (no call, no file).

Two checks need it before anything is paid for (`tinymars validate`, `tinymars cost --estimate`):
- *vocabulary*: SentencePiece BPE refuses more pieces than its text can make ("value <= N"), and it only
  says so at the tokenizer stage, after the corpus is bought. `supportable_pieces` estimates N from the
  text's distinct word types (calibrated against SentencePiece itself; tests/test_budget.py checks it).
- *epochs*: training reads steps x batch_size windows of seq_len tokens; with a replay section `replay.share`
  of them are replay windows (every position real) and the rest packed corpus windows (~95% real tokens,
  models.data). The corpus windows' tokens divided by the train split's tokens is how often each channel
  row is seen; the replay windows' tokens divided by replay.tokens is how often the replay text is.

Text comes from the corpus's own planners: the template teacher's generator (exact text) or, for a hosted
teacher, the planned prompts (exact) with each target as long as the template's and carrying the content
its request names (opener, answer core, closer, salient item); the teacher's own extra words are not
counted, so the vocabulary estimate is a floor for a hosted teacher. Replay text is unknown before the
replay source is read: the tokenizer's `replay.tokenizer_chars` of it count as English prose (a Heaps-law
fit of its word types).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from tinymars.domain import RESERVED_PIECES, SELECTION_CAPABILITIES

PACKING_EFFICIENCY = 0.95  # real positions per window position once seq_len holds a few rows (models.data)
ROW_SPECIAL_TOKENS = 3  # [bos] prompt <target> target [eos]
MAX_PIECE_CHARS = 16  # SentencePiece's max_sentencepiece_length default: no piece is longer
# BPE merges until every word is one piece = 6.69 x S^0.752, S = sum over distinct word types of
# (min(len, 16) - 1): fitted on SentencePiece's own "value <= N" for 4 template corpora (smoke 10-120 prompts,
# iter7 size) and 4 prose corpora (package + project docs, 27k-457k chars); every point within 10%.
MERGES_COEF, MERGES_EXP = 6.69, 0.752
# unigram's limit is about the word types: 0.86 x (types + chars + reserved) on the same template corpora
UNIGRAM_FRACTION = 0.86
# Heaps' law for S of unseen English prose of N chars: S = 2.58 x N^0.742 on the same docs (+-45%), taken at
# 0.75 of it so an unknown replay source is not credited with pieces it may not have
PROSE_S_COEF, PROSE_S_EXP, PROSE_SAFETY = 2.58, 0.742, 0.75
# chars per token of a BPE tokenizer trained on the corpus, by how full its vocabulary is (learned pieces /
# the most the text supports): measured on the smoke and iter7-sized template corpora at 1000-8000 pieces
CHARS_PER_TOKEN = ((0.0, 2.0), (0.09, 2.71), (0.16, 3.12), (0.22, 3.40), (0.35, 3.98), (0.73, 4.28), (1.0, 4.3))
WORD = re.compile(r"\s*(?:[^\W\d_]+|\d|[^\w\s]+|_+)")  # SentencePiece's pre-split: script runs, digits, symbols


@dataclass
class TextVolume:
    """One source of train-split text: rows, characters, and the texts the tokenizer would see (when known)."""

    rows: int = 0
    chars: int = 0
    heldout_rows: int = 0
    texts: list[str] = field(default_factory=list)


def word_types(texts: Iterable[str]) -> set[str]:
    """Distinct words as SentencePiece splits them (a leading space is the piece's '▁')."""
    out: set[str] = set()
    for text in texts:
        for m in WORD.finditer(text):
            w = m.group(0)
            out.add("▁" + w.lstrip() if w[0].isspace() or m.start() == 0 else w)
    return out


def merge_room(types: Iterable[str]) -> int:
    """S: the merges that would turn every word type into one piece, if no two words shared one."""
    return sum(min(len(w), MAX_PIECE_CHARS) - 1 for w in types)


def supportable_pieces(texts: list[str], model_type: str = "bpe", prose_chars: int = 0) -> int:
    """About the most pieces SentencePiece can learn from `texts` plus `prose_chars` of unseen English prose."""
    types = word_types(texts)
    chars = {c for t in texts for c in t if not c.isspace()}
    if model_type == "unigram":
        return round(UNIGRAM_FRACTION * (len(types) + len(chars) + RESERVED_PIECES)
                     + PROSE_SAFETY * PROSE_S_COEF * prose_chars ** PROSE_S_EXP / 6)  # ~6 letters a type
    room = merge_room(types) + PROSE_SAFETY * PROSE_S_COEF * prose_chars ** PROSE_S_EXP
    return RESERVED_PIECES + len(chars) + round(MERGES_COEF * room ** MERGES_EXP)


def chars_per_token(vocab_size: int, supportable: int) -> float:
    """Expected characters per token for a vocabulary `vocab_size` of the `supportable` most."""
    fill = min(1.0, max(0.0, (vocab_size - RESERVED_PIECES) / max(1, supportable - RESERVED_PIECES)))
    for (f0, c0), (f1, c1) in zip(CHARS_PER_TOKEN, CHARS_PER_TOKEN[1:], strict=False):
        if fill <= f1:
            return c0 + (c1 - c0) * (fill - f0) / (f1 - f0)
    return CHARS_PER_TOKEN[-1][1]


# ---------------------------------------------------------------- corpus text
def template_volumes(section: Any) -> dict[str, TextVolume]:
    """Per capability, the template teacher's own rows (exact; ~1 s at iter7 size)."""
    from corpus.template_teacher import generate_corpus

    rows, _ = generate_corpus(list(section.capabilities), section.prompts_per_capability,
                              section.conflict_prompts_per_capability, section.heldout_fraction, section.seed)
    out = {cap: TextVolume() for cap in section.capabilities}
    for r in rows:
        vol = out[r["capability"]]
        if r["split"] != "train":
            vol.heldout_rows += 1
            continue
        vol.rows += 1
        vol.chars += len(r["prompt"]) + len(r["target"])
        vol.texts += [r["prompt"], r["target"]]
    return out


def planned_volumes(section: Any) -> dict[str, TextVolume]:
    """Per capability, a hosted teacher's planned rows: exact prompts, template-length targets, and as target
    text only the content each request names (its words reach the corpus; the teacher's own may not)."""
    from corpus.teacher_corpus import plan_corpus
    from corpus.teacher_prompts import load_templates

    plan = plan_corpus(list(section.capabilities), section.prompts_per_capability,
                       section.conflict_prompts_per_capability, section.seed,
                       load_templates(section.teacher.prompts_dir), heldout_fraction=section.heldout_fraction)
    out = {cap: TextVolume() for cap in section.capabilities}
    for prompt in plan:
        vol = out[prompt.capability]
        if prompt.split != "train":
            vol.heldout_rows += len(prompt.slots)
            continue
        for slot in prompt.slots:
            f = slot.fields
            vol.rows += 1
            vol.chars += len(f["prompt"]) + slot.typical_chars
            content = f"{f['salient']} {f['keys']}" if slot.capability in SELECTION_CAPABILITIES \
                else f"{f['opener']} {f['core']} {f['closer']}"
            vol.texts += [f["prompt"], content]
    return out


def corpus_volumes(section: Any) -> dict[str, TextVolume]:
    """Per capability the train-split text the corpus will hold."""
    return template_volumes(section) if section.teacher.kind == "template" else planned_volumes(section)


# ---------------------------------------------------------------- the budget
_BUDGETS: dict[str, dict[str, Any]] = {}  # by profile hash: validate checks it, then prints it


def token_budget(prof: Any, vols: dict[str, TextVolume] | None = None) -> dict[str, Any]:
    """Vocabulary support, tokens per epoch per source, training tokens and epochs, from the profile alone."""
    if vols is None:
        key = prof.hash()
        if key not in _BUDGETS:
            _BUDGETS[key] = token_budget(prof, corpus_volumes(prof.corpus))
        return _BUDGETS[key]
    texts = [t for v in vols.values() for t in v.texts]
    replay = prof.replay
    prose = replay.tokenizer_chars if replay is not None else 0
    tok = prof.tokenizer
    supportable = supportable_pieces(texts, tok.model_type, prose)
    cpt = chars_per_token(tok.vocab_size, supportable)
    seq_len, train = prof.pack.seq_len, prof.train
    sources = {}
    for name, v in vols.items():
        tokens = round(v.chars / cpt) + ROW_SPECIAL_TOKENS * v.rows
        positions = min(tokens, v.rows * seq_len)  # a row is cut to seq_len + 1 tokens
        sources[name] = {"rows": v.rows, "heldout_rows": v.heldout_rows, "chars": v.chars, "tokens": positions}
    epoch_rows = sum(s["rows"] for s in sources.values())
    epoch_tokens = sum(s["tokens"] for s in sources.values())
    share = replay.share if replay is not None else 0.0
    windows = train.steps * train.batch_size
    replay_tokens = round(windows * share * seq_len)
    if train.packing:
        corpus_tokens = round(windows * (1 - share) * seq_len * PACKING_EFFICIENCY)
        epochs = corpus_tokens / max(1, epoch_tokens)
    else:
        epochs = train.steps * train.batch_size / max(1, epoch_rows)
        corpus_tokens = round(epochs * epoch_tokens)
    out = {"vocab_size": tok.vocab_size, "model_type": tok.model_type, "tokenizer_kind": tok.kind,
           "supportable_pieces": supportable,
           "vocab_from": ("template text" if prof.corpus.teacher.kind == "template"
                          else "planned prompts and requested content (the teacher's own words come on top)")
           + (f" + {prose:,} chars of replay prose" if prose else ""),
           "replay_prose_chars": prose, "chars_per_token": round(cpt, 2), "sources": sources,
           "epoch_rows": epoch_rows, "epoch_tokens": epoch_tokens, "corpus_tokens": corpus_tokens,
           "train_tokens": corpus_tokens + replay_tokens,
           "packing_efficiency": PACKING_EFFICIENCY if train.packing else None,
           "epochs": epochs, "max_corpus_epochs": train.max_corpus_epochs, "replay": None}
    if replay is not None:
        out["replay"] = {"share": share, "tokens": replay.tokens, "train_tokens": replay_tokens,
                         "epochs": replay_tokens / replay.tokens, "source": replay.source, "revision": replay.revision}
    return out


def budget_problems(budget: dict[str, Any]) -> list[str]:
    """What a run would meet after spending: each problem names the field and the fix."""
    problems = []
    if budget["vocab_size"] > budget["supportable_pieces"] and budget.get("tokenizer_kind") != "hf":  # hf: no training
        problems.append(
            f"tokenizer.vocab_size: {budget['vocab_size']} is more than this corpus's text can support (about "
            f"{budget['supportable_pieces']:,} pieces, estimated from the {budget['vocab_from']}); SentencePiece "
            "would refuse it at the tokenizer stage, after the corpus is built (and paid for); lower "
            f"tokenizer.vocab_size (to at most ~{budget['supportable_pieces']:,}), or add a replay section / raise "
            "replay.tokenizer_chars / corpus.prompts_per_capability for more text")
    if budget["epochs"] > budget["max_corpus_epochs"]:
        problems.append(
            f"train: {budget['corpus_tokens']:,} channel-corpus training tokens are {budget['epochs']:.1f} epochs of "
            f"the {budget['epoch_tokens']:,}-token train split, more than train.max_corpus_epochs "
            f"{budget['max_corpus_epochs']:g}; lower train.steps or train.batch_size, "
            + ("raise replay.share" if budget["replay"] else "add a replay section (replay: source, tokens, share)")
            + ", or raise train.max_corpus_epochs")
    return problems
