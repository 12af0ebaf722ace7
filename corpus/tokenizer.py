"""SentencePiece BPE trained on the corpus's train split, with the special pieces the packer and generator need."""

from __future__ import annotations

import io
import re
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm

PAD, UNK, BOS, EOS = 0, 1, 2, 3
TARGET_PIECE = "<target>"  # separates prompt from target; its id is fixed at 4


class TokenizerError(ValueError):
    pass


def training_texts(rows: Iterable[dict]) -> list[str]:
    """The prompts and targets of the train split only. Held-out text must not shape the vocabulary: a
    piece fitted to held-out strings would flatter held-out bits-per-byte. Held-out prompts still encode
    without <unk>: byte_fallback spells any unseen character as bytes."""
    texts = [t for r in rows if r["split"] == "train" for t in (r["prompt"], r["target"])]
    if not texts:
        raise TokenizerError("tokenizer: the corpus has no train-split rows to train on; lower "
                             "corpus.heldout_fraction or generate a larger corpus")
    return texts


def train_tokenizer(
    texts: Iterable[str],
    out_dir: Path,
    vocab_size: int,
    model_type: str = "bpe",
    character_coverage: float = 1.0,
) -> Path:
    """Train a SentencePiece model into `out_dir/tokenizer.model` (deterministic for the same texts)."""
    sentences = [t for t in texts if t.strip()]
    if not sentences:
        raise TokenizerError("tokenizer: the corpus has no text to train on; check the corpus stage output")
    # Train into memory: with model_prefix, SentencePiece records the output path inside the model,
    # and the same corpus would give different bytes (and a different content hash) per folder.
    buffer = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_writer=buffer,
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=character_coverage,
            pad_id=PAD,
            unk_id=UNK,
            bos_id=BOS,
            eos_id=EOS,
            user_defined_symbols=[TARGET_PIECE],
            shuffle_input_sentence=False,
            input_sentence_size=0,
            num_threads=1,
            byte_fallback=True,
            minloglevel=2,
        )
    except RuntimeError as exc:
        m = re.search(r"value <= (\d+)", str(exc))
        if m:
            raise TokenizerError(
                f"tokenizer.vocab_size: {vocab_size} is larger than this corpus supports "
                f"(at most {m.group(1)}); lower tokenizer.vocab_size or generate a larger corpus"
            ) from None
        m = re.search(r"smaller than required_chars\. \d+ vs (\d+)", str(exc))
        if m:
            raise TokenizerError(
                f"tokenizer.vocab_size: {vocab_size} is too small for this corpus: its characters and the reserved "
                f"pieces need at least {m.group(1)}; raise tokenizer.vocab_size (or lower "
                "tokenizer.character_coverage)"
            ) from None
        raise TokenizerError(f"tokenizer: SentencePiece failed: {exc}") from None
    path = out_dir / "tokenizer.model"
    path.write_bytes(buffer.getvalue())
    return path


class Tokenizer:
    """Thin wrapper so the rest of the code never touches SentencePiece ids by magic number."""

    def __init__(self, model_path: Path | str):
        self.sp = spm.SentencePieceProcessor(model_file=str(model_path))
        self.target_id = self.sp.piece_to_id(TARGET_PIECE)
        if self.target_id != 4:
            raise TokenizerError(f"{model_path}: not a tinymars tokenizer (no {TARGET_PIECE} piece at id 4)")

    pad_id, unk_id, bos_id, eos_id = PAD, UNK, BOS, EOS

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text, out_type=int)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode([i for i in ids if i > EOS and i != self.target_id])

    def prompt_ids(self, prompt: str) -> list[int]:
        """What the model sees before it answers: `[bos] prompt <target>`."""
        return [BOS, *self.encode(prompt), self.target_id]
