"""A live model: load a trained model with its tokenizer and channel layout, read a channel state, generate
(streamed token by token, batched, KV-cached) with optional steering and concept readouts, and score
continuations. The HTTP server (app/serve_model.py), the chat REPL and the online trainer
(models/online.py) all sit on this module; it knows nothing of FastAPI or Prefect.

    engine = Engine.load(".tinymars/artifacts/train/<key>", readouts=".tinymars/artifacts/steer/<key>")
    state = engine.parse_channels({"affect": "+", "memory": "spent a week in Lisbon with her sister"})
    req = engine.request(engine.chat_text([{"role": "user", "content": "How was your week?"}]),
                         channels=state, max_new_tokens=40, steer=engine.parse_steer({"concept": "affect",
                         "multiplier": 1.0}), readouts=True)
    print(engine.generate([req])[0].text)
    ablated = engine.request("How was your week?", channels=None)   # every channel zeroed

Channel states mean exactly what they meant in training (models.live_channels: the corpus encoders and
the model's own embedder, traced through the artifact store). Generation matches models.generate
token for token (greedy, and the same per-prompt Gumbel noise when sampling) but yields each token as it
is picked, so a server can stream it and serve requests with different settings in one batch.

Weights and concurrency: `engine.model` is an immutable snapshot. An online trainer never touches it;
it trains its own copy and `publish`es a new snapshot (a reference swap). A batch reads `engine.model`
once when it starts, so every token of a response comes from one consistent set of weights, while
later batches see the newer weights (read-copy-update: old snapshots are freed when their last batch ends).
An adapter (a frozen HF or tinymars base + channel adapters) is the exception: its base is too big to copy per
update, so `publish` copies the adapter weights into the one snapshot between batches, under the batch lock.
It decodes through the base's own KV cache (models.adapter.AdapterLM.decode) and has no steering or readouts.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.activations import residual_blocks
from models.distributed import Runtime
from models.generate import GREEDY, Sampling, eval_kind, eval_runtime
from models.live_channels import ChannelEncoder, ChannelLayout, ChannelStateError, parse_state
from models.steer_hook import add_to_residual

SERVABLE_ARCHS = ("native", "baseline", "vocab_graph", "vocab_conv", "adapter")
# An adapter's residual stream is its frozen base's, and steer readouts are extracted from a native's: no readout
# file describes it, so steering and readouts are refused (clear 400s) rather than guessed.
NO_READOUT_ARCHS = ("adapter",)
CHAT_ROLES = ("system", "user", "assistant")
GUMBEL_ROW = 0  # a request draws the noise models.generate gives a prompt in row 0: its own, batch or not


class EngineError(ValueError):
    """A model, tokenizer or readout the engine cannot serve; the message names the file or flag and the fix."""


class RequestError(ValueError):
    """A generation/scoring request that cannot be served; `field` names the request field."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


# ---- where a model's tokenizer and channel layout come from ---------------------------------------------
@dataclass(frozen=True)
class ModelSource:
    """A trained model folder and what it was trained with, traced through its artifact store's manifests."""

    model_dir: Path
    name: str
    arch: str
    tokenizer: Path  # a SentencePiece tokenizer.model, or a tokenizer artifact folder (open_tokenizer opens both)
    layout: ChannelLayout
    seq_len: int
    content_hash: str | None  # the model artifact's content hash (None: a folder outside any store)
    pack_hash: str | None
    base: Path | None = None  # an adapter's frozen base folder (absolute); None for every other arch

    def load_model(self) -> nn.Module:
        """A fresh copy of the trained weights (an adapter with its own copy of the base), on the CPU."""
        from models.checkpoint import load_model

        return load_model(self.model_dir, base=self.base)


def open_tokenizer(path: str | Path) -> Any:
    """A `ModelSource.tokenizer`: a SentencePiece model file, or a tokenizer artifact folder (ours or an HF base's)."""
    from corpus.tokenizer import Tokenizer, load_tokenizer

    path = Path(path)
    return Tokenizer(path) if path.is_file() else load_tokenizer(path)


def _manifest(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        return None


def _by_hash(root: Path, stage: str, content_hash: str) -> tuple[Path, dict[str, Any]] | None:
    for path in sorted((root / stage).glob("*/manifest.json")):
        m = _manifest(path.parent)
        if m is not None and m.get("content_hash") == content_hash:
            return path.parent, m
    return None


def trace_model(model_dir: str | Path, tokenizer: str | Path | None = None,
                base: str | Path | None = None) -> ModelSource:
    """The model folder's arch, tokenizer and channel layout (names, widths, embedder), and an adapter's base.

    Follows the manifests' input hashes (model -> pack -> tokenizer, channels), so it finds the exact
    tokenizer and embedder the model was trained with (an adapter's: its HF base's own tokenizer artifact).
    A folder outside a store needs `tokenizer`; its channel layout then comes from model.json alone and text
    channels have no embedder. An adapter's base is the folder its model.json records (build.spec.base, as the
    train stage resolved it) unless `base` names it (the base moved, or the model came from another machine).
    """
    folder = Path(model_dir).expanduser().resolve()
    meta_path = folder / "model.json"
    if not meta_path.is_file():
        raise EngineError(f"model: {folder} has no model.json; pass a trained model folder or its artifact hash")
    info = json.loads(meta_path.read_text())["build"]
    if info["arch"] not in SERVABLE_ARCHS:
        raise EngineError(f"model: arch {info['arch']!r} is not servable; supported: {', '.join(SERVABLE_ARCHS)}")
    base_dir = _adapter_base(info, base) if info["arch"] == "adapter" else None
    manifest = _manifest(folder) or {}
    pack_hash = manifest.get("inputs", {}).get("pack")
    root = folder.parents[1]
    pack = _by_hash(root, "pack", pack_hash) if pack_hash else None
    names = tuple(info["channel_names"]) if info["arch"] not in ("baseline", "vocab_graph", "vocab_conv") else ()
    dims = tuple(info["spec"].get("channel_dims") or [info["channel_dim"]] * len(names))
    embedder = None
    if pack is not None:
        pack_dir, pack_manifest = pack
        pack_meta = json.loads((pack_dir / "pack.json").read_text())
        if names:
            dims = tuple(pack_meta["channel_dims"][pack_meta["channel_names"].index(n)] for n in names)
        channels = _by_hash(root, "channels", pack_manifest["inputs"].get("channels", ""))
        if channels is not None:
            embedder = json.loads((channels[0] / "channels.json").read_text()).get("embedder")
        tok = _by_hash(root, "tokenizer", pack_manifest["inputs"].get("tokenizer", ""))
        if tokenizer is None and tok is not None:  # ours (tokenizer.model) or an HF base's (the artifact folder)
            tokenizer = tok[0] / "tokenizer.model" if (tok[0] / "tokenizer.model").is_file() else tok[0]
    if tokenizer is None:
        raise EngineError(f"tokenizer: cannot trace {folder} to its tokenizer through the artifact store ({root}); "
                          "pass --tokenizer PATH/tokenizer.model (or a tokenizer artifact folder)")
    if not Path(tokenizer).exists():
        raise EngineError(f"tokenizer: {tokenizer} does not exist")
    name = manifest.get("meta", {}).get("model") or folder.name
    return ModelSource(folder, str(name), info["arch"], Path(tokenizer),
                       ChannelLayout(names, dims, int(info["channel_dim"]) if names else 0, embedder),
                       int(info["seq_len"]), manifest.get("content_hash"), pack_hash, base_dir)


def _adapter_base(info: dict[str, Any], base: str | Path | None) -> Path:
    """The adapter's frozen base folder, checked before anything loads (weights never download here)."""
    recorded = info["spec"].get("base")
    folder = Path(base if base is not None else str(recorded)).expanduser()
    if not folder.is_dir():
        where = "--base" if base is not None else "model.json build.spec.base"
        raise EngineError(f"base: the adapter's frozen base {str(folder)!r} ({where}) is not a folder; pass --base "
                          "PATH: the base's Hugging Face (or tinymars) model folder")
    return folder.resolve()


# ---- readouts and steering ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Readout:
    """Concept directions at one layer (unit vectors, [n_concepts, H]) and that layer's mean residual norm."""

    layer: int
    concepts: tuple[str, ...]
    directions: Tensor
    layer_norm: float
    method: str

    def scores(self, hidden: Tensor) -> Tensor:
        """[B, n_concepts]: the hidden states [B, H] projected on each unit direction."""
        return hidden.float() @ self.directions.T.to(hidden.device)


def load_readouts(path: str | Path, hidden_size: int, layer: int | str = "auto") -> Readout:
    """A steer artifact folder (or its readout.safetensors) as one layer's unit directions."""
    from models.steer_hook import choose_layer
    from models.steering import ReadoutError, load_readout

    folder = Path(path).expanduser()
    folder = folder.parent if folder.is_file() else folder
    try:
        vectors, meta = load_readout(folder)
    except ReadoutError as exc:
        raise EngineError(f"readouts: {exc}") from None
    if int(meta["hidden_size"]) != hidden_size:
        raise EngineError(f"readouts: {folder} was read out of a {meta['hidden_size']}-wide model, this model is "
                          f"{hidden_size} wide; extract a readout of this model (tinymars steer)")
    chosen, _ = choose_layer(layer, meta)
    rows = vectors[chosen].float()
    return Readout(chosen, tuple(meta["concepts"]), rows / rows.norm(dim=-1, keepdim=True).clamp_min(1e-12),
                   float(meta["layer_norms"][str(chosen)]), str(meta["method"]))


@dataclass(frozen=True)
class SteerSpec:
    """Add `multiplier` x the layer's mean residual norm x the concept's unit direction (negative: other pole)."""

    concept: str
    multiplier: float


# ---- requests and results ----------------------------------------------------------------------------
@dataclass(frozen=True)
class GenerationRequest:
    """One prompt to continue. `channels` is a parsed state (Engine.parse_channels); None or {}: ablated."""

    prompt_ids: list[int]
    channels: dict[str, Any] | None = None
    max_new_tokens: int = 64
    sampling: Sampling = GREEDY
    steer: tuple[SteerSpec, ...] = ()
    readouts: bool = False


@dataclass(frozen=True)
class TokenEvent:
    """One step of row `row`: a new token (with its concept scores when asked) or, finally, the finish reason."""

    row: int
    token_id: int | None
    readout: dict[str, float] | None = None
    finish_reason: str | None = None  # "stop" (eos) | "length"; set on the row's last event only


@dataclass
class Generation:
    token_ids: list[int]
    text: str
    finish_reason: str
    prompt_tokens: int
    readouts: list[dict[str, float]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


# ---- the engine ----------------------------------------------------------------------------------------
class Engine:
    """A loaded model ready to serve: see the module doc for the API and the snapshot rule."""

    def __init__(self, model: nn.Module, source: ModelSource, tokenizer: Any, readout: Readout | None = None,
                 runtime: Runtime | None = None, channel_encoder: ChannelEncoder | None = None):
        self.source = source
        self.tokenizer = tokenizer
        self.readout = readout
        self.runtime = runtime or eval_runtime("cpu")
        self.channels = channel_encoder or ChannelEncoder(source.layout)
        self._model = self._frozen(model)
        self._lock = threading.Lock()  # hooks live on the snapshot: one batch at a time per engine
        self.version = 0  # bumped by every publish

    @classmethod
    def load(cls, model_dir: str | Path, *, tokenizer: str | Path | None = None, readouts: str | Path | None = None,
             readout_layer: int | str = "auto", device: str = "cpu",
             embed: Callable[[list[str]], np.ndarray] | None = None, base: str | Path | None = None) -> Engine:
        """Load a trained model folder, its tokenizer and channel layout (traced), and optionally a readout.

        `embed` (texts -> L2-normalised vectors) replaces loading the model's embedder: pass one you already
        hold, and make sure it is the embedder the model was trained with (`source.layout.embedder`).
        `base`: an adapter's frozen base folder when the one its model.json records has moved.
        """
        source = trace_model(model_dir, tokenizer, base)
        if readouts is not None and source.arch in NO_READOUT_ARCHS:
            raise EngineError(f"readouts: arch {source.arch!r} cannot be steered or read out (its residual stream is "
                              "a frozen base's; steer readouts are extracted from a native); serve it without "
                              "--readouts")
        runtime = eval_runtime(eval_kind(device))
        model = source.load_model()
        readout = None
        if readouts is not None:
            readout = load_readouts(readouts, _hidden_size(model), readout_layer)
        return cls(model, source, open_tokenizer(source.tokenizer), readout, runtime,
                   ChannelEncoder(source.layout, embed))

    def _frozen(self, model: nn.Module) -> nn.Module:
        model = model.to(self.runtime.device).eval()
        model.requires_grad_(False)
        return model

    @property
    def model(self) -> nn.Module:
        """The current weights snapshot (read it once per batch)."""
        return self._model

    @property
    def publishes_in_place(self) -> bool:
        """An adapter's snapshot is updated in place (its frozen base is too big to copy per update; see publish)."""
        return self.source.arch == "adapter"

    def publish(self, model: nn.Module) -> None:
        """Make `model`'s weights the ones new batches use; running batches keep theirs.

        Natives and the rest: `model` (a copy nobody else mutates) becomes the snapshot (a reference swap).
        An adapter: its trained weights are copied into the one snapshot under the batch lock, between batches
        (a batch holds the lock for all its tokens), so its frozen base is never copied.
        """
        if self.publishes_in_place:
            with self._lock, torch.no_grad():
                self._model.load_state_dict(model.state_dict())
        else:
            self._model = self._frozen(model)
        self.version += 1

    def describe(self) -> dict[str, Any]:
        s = self.source
        return {"name": s.name, "arch": s.arch, "content_hash": s.content_hash, "seq_len": s.seq_len,
                **({"base": str(s.base)} if s.base is not None else {}),
                "channels": dict(zip(s.layout.names, s.layout.dims, strict=True)), "embedder": s.layout.embedder,
                "readout": None if self.readout is None else {
                    "layer": self.readout.layer, "concepts": list(self.readout.concepts),
                    "method": self.readout.method}, "version": self.version}

    # ---- inputs ------------------------------------------------------------------------------------
    def parse_channels(self, raw: Any, field: str = "channels") -> dict[str, Any]:
        """A request's channel state in the corpus's contract; ChannelStateError (a ValueError) names the field."""
        return parse_state(raw, self.source.layout, field)

    def channel_tensor(self, states: Sequence[dict[str, Any] | None]) -> Tensor | None:
        """[N, C, D] for parsed states (None for a channel-less model): texts embedded by the model's embedder."""
        if not self.source.layout.names:
            return None
        return self.channels.tensor(states)

    def parse_steer(self, raw: Any, field: str = "steer") -> tuple[SteerSpec, ...]:
        """`{"concept": c, "multiplier": m}` or a list of them, checked against the loaded readout."""
        if raw is None:
            return ()
        self._check_readable(field)
        if self.readout is None:
            raise RequestError(field, "this engine has no readout file; start it with --readouts STEER_ARTIFACT")
        items = raw if isinstance(raw, list) else [raw]
        out = []
        for i, item in enumerate(items):
            where = f"{field}[{i}]" if isinstance(raw, list) else field
            if not isinstance(item, dict) or set(item) - {"concept", "multiplier"}:
                raise RequestError(where, 'expected {"concept": name, "multiplier": number}')
            if item.get("concept") not in self.readout.concepts:
                raise RequestError(f"{where}.concept", f"{item.get('concept')!r} is not in the readout; "
                                   f"concepts: {', '.join(self.readout.concepts)}")
            m = item.get("multiplier", 1.0)
            if not isinstance(m, int | float) or isinstance(m, bool) or not torch.isfinite(torch.tensor(float(m))):
                raise RequestError(f"{where}.multiplier", f"must be a finite number, got {m!r}")
            out.append(SteerSpec(item["concept"], float(m)))
        return tuple(out)

    def _check_readable(self, field: str) -> None:
        if self.source.arch in NO_READOUT_ARCHS:
            raise RequestError(field, f"arch {self.source.arch!r} has no steering or readouts (its residual stream "
                               "is a frozen base's; steer readouts are extracted from a native); leave it out")

    def prompt_ids(self, text: str) -> list[int]:
        """`[bos] text <target>` (an HF base's tokenizer: `[bos] text separator`): what the model answers after."""
        return self.tokenizer.prompt_ids(text)

    def continuation_ids(self, text: str) -> list[int]:
        """A target as the model learned it: its tokens, then eos."""
        return [*self.tokenizer.encode(text), self.tokenizer.eos_id]

    @staticmethod
    def chat_text(messages: Sequence[dict[str, Any]], field: str = "messages") -> str:
        """A conversation as one prompt, the way the eval's follow-up turns are written: the turns joined by spaces.

        The model is not chat-tuned; roles are not written (a system message is just the opening text).
        """
        if not isinstance(messages, list | tuple) or not messages:
            raise RequestError(field, "expected a non-empty list of {role, content} messages")
        parts = []
        for i, msg in enumerate(messages):
            if not isinstance(msg, dict) or msg.get("role") not in CHAT_ROLES:
                raise RequestError(f"{field}[{i}].role", f"must be one of {', '.join(CHAT_ROLES)}")
            content = msg.get("content")
            if isinstance(content, list):  # OpenAI content parts: text parts only
                if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                    raise RequestError(f"{field}[{i}].content", "only text parts are supported")
                content = " ".join(str(p.get("text", "")) for p in content)
            if not isinstance(content, str):
                raise RequestError(f"{field}[{i}].content", "must be a text")
            if content.strip():
                parts.append(content.strip())
        if not parts:
            raise RequestError(field, "every message is empty")
        return " ".join(parts)

    def request(self, prompt: str | list[int], *, channels: dict[str, Any] | None = None, max_new_tokens: int = 64,
                sampling: Sampling = GREEDY, steer: tuple[SteerSpec, ...] = (), readouts: bool = False,
                field: str = "prompt") -> GenerationRequest:
        """A checked request: text is put in the prompt layout, ids are taken as given; max_new_tokens is
        clipped to the model's context (seq_len)."""
        ids = self.prompt_ids(prompt) if isinstance(prompt, str) else list(prompt)
        vocab = self.tokenizer.vocab_size
        if not ids or any(not isinstance(t, int) or not 0 <= t < vocab for t in ids):
            raise RequestError(field, f"needs at least one token, every id in 0..{vocab - 1}")
        if len(ids) >= self.source.seq_len:
            raise RequestError(field, f"{len(ids)} tokens; this model's context is {self.source.seq_len} tokens")
        if max_new_tokens < 1:
            raise RequestError("max_tokens", f"must be >= 1, got {max_new_tokens}")
        if readouts:
            self._check_readable("readouts")
        if readouts and self.readout is None:
            raise RequestError("readouts", "this engine has no readout file; start it with --readouts STEER_ARTIFACT")
        budget = min(max_new_tokens, self.source.seq_len - len(ids))
        return GenerationRequest(ids, channels or None, budget, sampling, tuple(steer), readouts)

    # ---- generation --------------------------------------------------------------------------------
    def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        """Every request continued in one batch; the results in request order."""
        tokens: list[list[int]] = [[] for _ in requests]
        scores: list[list[dict[str, float]]] = [[] for _ in requests]
        finish = ["length"] * len(requests)
        for ev in self.stream_batch(requests):
            if ev.token_id is not None:
                tokens[ev.row].append(ev.token_id)
                if ev.readout is not None:
                    scores[ev.row].append(ev.readout)
            if ev.finish_reason is not None:
                finish[ev.row] = ev.finish_reason
        return [Generation(t, self.tokenizer.decode(t), f, len(r.prompt_ids), s if r.readouts else None)
                for t, s, f, r in zip(tokens, scores, finish, requests, strict=True)]

    def stream_batch(self, requests: Sequence[GenerationRequest]) -> Iterator[TokenEvent]:
        """Yield each row's tokens as they are picked (eos is not yielded: it ends the row with "stop")."""
        if not requests:
            return
        channels = self.channel_tensor([r.channels for r in requests])
        with self._lock, torch.no_grad():
            model = self._model  # one snapshot for the whole batch
            yield from _decode(model, list(requests), channels, self.tokenizer.eos_id, self.tokenizer.pad_id,
                               self.readout, self.runtime)

    # ---- scoring -----------------------------------------------------------------------------------
    def continuation_losses(self, examples: Sequence[tuple[list[int], list[int]]],
                            states: Sequence[dict[str, Any] | None]) -> list[float]:
        """Mean next-token loss (nats) of each continuation given its context; the context itself is not scored."""
        with self._lock, torch.no_grad():  # the lock: no generation batch's hooks on the snapshot meanwhile
            model = self._model
            batch = continuation_batch(examples, self.tokenizer.pad_id, self.source.seq_len)
            channels = self.channel_tensor(states)
            with self.runtime.autocast():
                return per_row_loss(model, batch, channels, self.runtime.device).tolist()


def _hidden_size(model: nn.Module) -> int:
    cfg = getattr(model, "cfg", None)
    if cfg is not None and hasattr(cfg, "d_model"):
        return int(cfg.d_model)
    return int(model.wte.weight.shape[1])


# ---- the decode loop -------------------------------------------------------------------------------
def _pick(logits: Tensor, requests: list[GenerationRequest], gens: list[torch.Generator | None]) -> Tensor:
    """Greedy argmax per row, or (sampling rows) the Gumbel-max draw models.generate makes for a prompt."""
    picked = logits.argmax(dim=-1)
    for b, (req, gen) in enumerate(zip(requests, gens, strict=True)):
        if gen is None:
            continue
        s = req.sampling
        scaled = logits[b].float() / s.temperature
        if s.top_k is not None and s.top_k < scaled.size(-1):
            kth = scaled.topk(s.top_k).values[-1]
            scaled = scaled.masked_fill(scaled < kth, float("-inf"))
        noise = -torch.log(-torch.log(torch.rand(scaled.size(-1), generator=gen)))
        picked[b] = (scaled + noise.to(scaled.device)).argmax()
    return picked


def _decode(model: nn.Module, requests: list[GenerationRequest], channels: Tensor | None, eos_id: int, pad_id: int,
            readout: Readout | None, runtime: Runtime) -> Iterator[TokenEvent]:
    device = runtime.device
    B, L = len(requests), max(len(r.prompt_ids) for r in requests)
    idx = torch.full((B, L), pad_id, dtype=torch.long)
    valid = torch.zeros(B, L, dtype=torch.bool)
    for b, r in enumerate(requests):  # left padding: the cache's mask and per-row positions make it exact
        idx[b, L - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
        valid[b, L - len(r.prompt_ids):] = True
    budget = max(r.max_new_tokens for r in requests)
    gens = [None if r.sampling.greedy else torch.Generator().manual_seed(r.sampling.seed * 1_000_003 + GUMBEL_ROW)
            for r in requests]
    caught: list[Tensor] = []
    with ExitStack() as stack:
        if any(r.steer for r in requests):
            stack.enter_context(add_to_residual(model, readout.layer, _steer_vectors(requests, readout)))
        if readout is not None and any(r.readouts for r in requests):
            block = residual_blocks(model)[readout.layer]
            handle = block.register_forward_hook(
                lambda _m, _a, out: caught.append((out[0] if isinstance(out, tuple) else out)[:, -1].detach()))
            stack.callback(handle.remove)
        stack.enter_context(runtime.autocast())
        cache = model.new_cache(B, L + budget)
        ch = channels.to(device) if channels is not None else None
        logits = model.decode(idx.to(device), cache, ch, valid.to(device))[:, -1]
        live = [True] * B
        for t in range(budget):
            nxt = _pick(logits, requests, gens)
            scores = readout.scores(caught[-1]).tolist() if caught else None
            caught.clear()
            for b, r in enumerate(requests):
                if not live[b]:
                    continue
                token = int(nxt[b])
                if token == eos_id:
                    live[b] = False
                    yield TokenEvent(b, None, finish_reason="stop")
                    continue
                read = dict(zip(readout.concepts, scores[b], strict=True)) if r.readouts and scores else None
                last = t + 1 >= r.max_new_tokens
                live[b] = not last
                yield TokenEvent(b, token, read, "length" if last else None)
            if not any(live):
                break
            logits = model.decode(nxt[:, None], cache)[:, -1]  # finished rows keep decoding; their tokens are dropped


def _steer_vectors(requests: list[GenerationRequest], readout: Readout) -> Tensor:
    out = torch.zeros(len(requests), readout.directions.size(1))
    for b, r in enumerate(requests):
        for spec in r.steer:
            out[b] += spec.multiplier * readout.layer_norm * readout.directions[readout.concepts.index(spec.concept)]
    return out


# ---- continuation loss (scoring here, training in models.online) -----------------------------------
@dataclass(frozen=True)
class ContinuationBatch:
    """Right-padded inputs [B, T], next-token targets [B, T] and the mask of continuation targets [B, T]."""

    idx: Tensor
    targets: Tensor
    mask: Tensor


def continuation_batch(examples: Sequence[tuple[list[int], list[int]]], pad_id: int,
                       seq_len: int) -> ContinuationBatch:
    """context + continuation per row; only the continuation's tokens are targets (the context is frozen)."""
    rows = []
    for i, (context, continuation) in enumerate(examples):
        if not context or not continuation:
            raise RequestError(f"examples[{i}]", "needs a non-empty context and continuation")
        if len(context) + len(continuation) > seq_len + 1:
            raise RequestError(f"examples[{i}]", f"context + continuation is {len(context) + len(continuation)} "
                               f"tokens; this model trains on at most {seq_len + 1}")
        rows.append((context, continuation))
    width = max(len(c) + len(k) - 1 for c, k in rows)
    idx = torch.full((len(rows), width), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width)
    for b, (context, continuation) in enumerate(rows):
        full = torch.tensor(context + continuation)
        n = len(full) - 1
        idx[b, :n], targets[b, :n] = full[:-1], full[1:]
        mask[b, len(context) - 1:n] = 1.0  # the targets that are continuation tokens
    return ContinuationBatch(idx, targets, mask)


def per_row_loss(model: nn.Module, batch: ContinuationBatch, channels: Tensor | None, device: torch.device) -> Tensor:
    """[B] mean cross-entropy over each row's continuation tokens (differentiable)."""
    logits, _ = model(batch.idx.to(device), channels.to(device) if channels is not None else None)
    ce = F.cross_entropy(logits.float().flatten(0, 1), batch.targets.to(device).flatten(), reduction="none")
    mask = batch.mask.to(device)
    return (ce.view_as(mask) * mask).sum(1) / mask.sum(1)


def continuation_ids_of(engine: Engine, value: Any, field: str, *, as_context: bool) -> list[int]:
    """Token ids as given, or a text tokenized as a context (`[bos] text <target>`) or a continuation (+ eos)."""
    if isinstance(value, str):
        if not value.strip():
            raise RequestError(field, "is empty")
        return engine.prompt_ids(value) if as_context else engine.continuation_ids(value)
    vocab = engine.tokenizer.vocab_size
    if isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool)
                                                 and 0 <= t < vocab for t in value):
        return list(value)
    raise RequestError(field, f"expected a text or a non-empty list of token ids in 0..{vocab - 1}")


__all__ = ["ChannelStateError", "ContinuationBatch", "Engine", "EngineError", "Generation", "GenerationRequest",
           "ModelSource", "Readout", "RequestError", "SteerSpec", "TokenEvent", "continuation_batch",
           "continuation_ids_of", "load_readouts", "open_tokenizer", "per_row_loss", "trace_model"]
