"""The tokenizers the packer and generator use: SentencePiece BPE trained on the corpus's train split (with the
special pieces they need), or, for the adapter track, a frozen Hugging Face base's own tokenizer (HFTokenizer)."""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

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
    kind = "sentencepiece"

    @property
    def target_ids(self) -> tuple[int, ...]:
        return (self.target_id,)

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


# ---------------------------------------------------------------- a frozen base's own tokenizer (adapter track)
HF_META = "hf_tokenizer.json"  # our record of an HF tokenizer artifact (HF's own files sit in HF_FOLDER)
HF_FOLDER = "hf"
# The files that define an HF tokenizer (and config.json: the embedding rows the ids index); hashed for the key.
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                      "tokenizer.model", "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja", "config.json")
DEFAULT_SEPARATOR = "\nAnswer:"


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def hf_source_identity(base: str, revision: str | None) -> dict[str, Any]:
    """What an HF tokenizer is, for a cache key: a local folder by its files' content (moving it changes
    nothing, editing it changes the key), a hub model by its name and pinned revision."""
    folder = Path(base).expanduser()
    if not folder.is_dir():
        return {"hub": base, "revision": revision}
    files = {name: _sha256(folder / name) for name in HF_TOKENIZER_FILES if (folder / name).is_file()}
    if not any(name != "config.json" for name in files):
        raise TokenizerError(f"tokenizer.base: '{base}' holds no tokenizer files ({', '.join(HF_TOKENIZER_FILES[:3])}, "
                             "...); point it at the Hugging Face model folder the adapter's base was saved to")
    return {"local_files": files}


def _embedding_rows(base: str, revision: str | None, local: bool) -> int | None:
    """The base's vocabulary size (its embedding rows; may exceed the tokenizer's length when padded)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(base, revision=revision, local_files_only=local)
    except (OSError, ValueError):
        return None
    return getattr(getattr(config, "text_config", None) or config, "vocab_size", None)


def base_vocab_size(base: str, revision: str | None = None) -> int:
    """A base's vocabulary (its embedding rows) from its config alone: what `tinymars models` sizes with."""
    local = Path(base).expanduser().is_dir()
    rows = _embedding_rows(str(Path(base).expanduser()) if local else base, revision, local)
    if rows is None:
        raise TokenizerError(f"tokenizer.base: cannot read the vocabulary size of '{base}' (no readable config.json"
                             "); point it at the adapter base's Hugging Face model folder")
    return int(rows)


def save_hf_tokenizer(base: str, revision: str | None, separator: str, out_dir: Path) -> dict[str, Any]:
    """Copy a base's own tokenizer into `out_dir/hf/` and record it in `out_dir/hf_tokenizer.json`.

    The artifact holds the tokenizer files themselves (with their sha256), so pack, generate and a later
    rerun read exactly these bytes, whatever happens to the base folder or the hub afterwards."""
    import transformers
    from transformers import AutoTokenizer

    transformers.utils.logging.set_verbosity_error()
    local = Path(base).expanduser().is_dir()
    try:
        hf = AutoTokenizer.from_pretrained(str(Path(base).expanduser()) if local else base, revision=revision,
                                           local_files_only=local)
    except (OSError, ValueError) as exc:
        raise TokenizerError(f"tokenizer.base: cannot load a tokenizer from '{base}' ({type(exc).__name__}: "
                             f"{str(exc)[:200]}); point it at a Hugging Face model folder or a hub name with "
                             "tokenizer.revision") from None
    folder = out_dir / HF_FOLDER
    hf.save_pretrained(str(folder))
    rows = _embedding_rows(str(Path(base).expanduser()) if local else base, revision, local)
    record = {"kind": "hf", "base": base, "revision": revision, "separator": separator,
              "vocab_size": max(len(hf), rows or 0),
              "files": {p.name: _sha256(p) for p in sorted(folder.iterdir()) if p.is_file()}}
    (out_dir / HF_META).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    HFTokenizer(out_dir)  # refuse here, not at pack time, a tokenizer without eos or an empty separator
    return record


class HFTokenizer:
    """A frozen base's own tokenizer behind the interface of `Tokenizer` (what pack and generate use).

    The prompt/target separator is text (`separator`, default "\\nAnswer:"), not a new special token: a
    new token would need a new embedding row, and the base is frozen, so its embedding would stay
    random; text the base already reads costs nothing and is what a base model is prompted with anyway.
    bos: the tokenizer's bos, else its eos (GPT-2's convention); pad: its pad, else eos (padding is
    masked by position everywhere, never found by id). `vocab_size` is the base's embedding rows.
    """

    kind = "hf"

    def __init__(self, folder: Path | str):
        from transformers import AutoTokenizer

        folder = Path(folder)
        self.record = json.loads((folder / HF_META).read_text())
        self.hf = AutoTokenizer.from_pretrained(str(folder / HF_FOLDER), local_files_only=True)
        eos = self.hf.eos_token_id
        if eos is None:
            raise TokenizerError(f"tokenizer.base: the tokenizer of '{self.record['base']}' has no eos token, so "
                                 "an answer could never end; use a base whose tokenizer defines eos_token")
        self.eos_id = int(eos)
        self.bos_id = int(self.hf.bos_token_id if self.hf.bos_token_id is not None else eos)
        self.pad_id = int(self.hf.pad_token_id if self.hf.pad_token_id is not None else eos)
        self.unk_id = self.hf.unk_token_id
        self.separator = self.record["separator"]
        self.target_ids = tuple(self.encode(self.separator))
        if not self.target_ids:
            raise TokenizerError(f"tokenizer.separator: {self.separator!r} encodes to no tokens with this "
                                 "tokenizer (whitespace is dropped by some); use visible text, e.g. '\\nAnswer:'")
        self.vocab_size = int(self.record["vocab_size"])

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=True)

    def prompt_ids(self, prompt: str) -> list[int]:
        """What the model sees before it answers: `[bos] prompt separator`."""
        return [self.bos_id, *self.encode(prompt), *self.target_ids]


def load_tokenizer(folder: Path | str) -> Tokenizer | HFTokenizer:
    """The tokenizer in a tokenizer artifact: our SentencePiece model, or a base's own (HF) tokenizer."""
    folder = Path(folder)
    if (folder / HF_META).is_file():
        return HFTokenizer(folder)
    if (folder / "tokenizer.model").is_file():
        return Tokenizer(folder / "tokenizer.model")
    raise TokenizerError(f"{folder}: not a tokenizer artifact (no tokenizer.model, no {HF_META}); rerun the "
                         "tokenizer stage (--refresh tokenizer)")
