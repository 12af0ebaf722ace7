"""Online learning for a live model: (context, continuation, channel state) examples, trained in a worker thread.

- Loss on the continuation only: the context is input, never a target (models.engine.continuation_batch).
- AdamW whose state persists across calls, and across restarts: a checkpoint saves it beside the weights
  (optimizer.pt) and a trainer started from that checkpoint continues from it.
- An example is identified by the content hash of its token ids and its parsed channel state; one already
  learned (or waiting) is skipped, whichever call sends it again. A checkpoint lists every example its
  weights have learned (examples.jsonl, cumulative over the chain of online checkpoints).
- The worker trains its own copy of the weights, never the engine's snapshot. After each call's update it
  publishes a copy (Engine.publish), so generation never waits for training and never sees a half-applied
  step: a batch reads one snapshot for all its tokens. An adapter trains its adapter weights only (its base is
  frozen and kept out of the optimizer; the trainer holds its own copy of the base, so a training forward never
  runs through the hooks of the base that generation is decoding with) and is published in place.
- `checkpoint` writes a new model artifact through the ArtifactStore (stage `train`, the same files as a
  trained model plus optimizer.pt and examples.jsonl) and records it in lineage with its parent model.
"""

from __future__ import annotations

import copy
import json
import queue
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load, save

from models.checkpoint import torch_bytes
from models.engine import Engine, continuation_batch, per_row_loss
from models.weights import WEIGHTS, cpu_state
from tinymars.artifacts import Artifact, ArtifactStore, canonical_json, hash_bytes, hash_json
from tinymars.lineage import Lineage

OPTIMIZER_FILE = "optimizer.pt"
EXAMPLES_FILE = "examples.jsonl"
METRICS_FILE = "metrics.jsonl"
ONLINE_STAGE = "train"  # an online checkpoint is a model like any other: tokenizer tracing and `steer` find it


@dataclass(frozen=True)
class Example:
    """One thing to learn: the continuation's tokens after the context's, under a channel state."""

    context: list[int]
    continuation: list[int]
    channels: dict[str, Any]

    @property
    def id(self) -> str:
        """The content hash: the same ids and state are the same example, whoever sends them."""
        return hash_json({"context": self.context, "continuation": self.continuation, "channels": self.channels})

    def record(self) -> dict[str, Any]:
        return {"id": self.id, "context": self.context, "continuation": self.continuation, "channels": self.channels}


@dataclass(frozen=True)
class OptimizerSettings:
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")


@dataclass
class Job:
    """One /train call's queued examples; `done` is set when they are learned (or the update failed)."""

    examples: list[Example]
    steps: int
    lr: float | None
    done: threading.Event = field(default_factory=threading.Event)
    losses: list[float] = field(default_factory=list)  # the mean continuation loss of each step, before it
    error: str | None = None


class OnlineTrainer:
    """Learns examples in a background thread on its own copy of the engine's model; see the module doc."""

    def __init__(self, engine: Engine, settings: OptimizerSettings = OptimizerSettings(), batch_size: int = 8):
        self.engine = engine
        self.settings = settings
        self.batch_size = batch_size
        self.model = engine.source.load_model().to(engine.runtime.device).train()
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=settings.lr, weight_decay=settings.weight_decay,
                                           betas=settings.betas)
        folder = engine.source.model_dir
        if (folder / OPTIMIZER_FILE).is_file():  # an online checkpoint: continue its optimizer's moments
            self.optimizer.load_state_dict(torch.load(folder / OPTIMIZER_FILE, map_location="cpu", weights_only=True))
        self.learned: list[dict[str, Any]] = []
        if (folder / EXAMPLES_FILE).is_file():
            self.learned = [json.loads(line) for line in (folder / EXAMPLES_FILE).read_text().splitlines() if line]
        self.parent_hash = engine.source.content_hash
        self._seen = {r["id"] for r in self.learned}
        self._history: list[dict[str, Any]] = []  # one record per optimizer step since the last checkpoint
        self._lock = threading.Lock()  # held for a whole update and while a checkpoint copies the state
        self._state_lock = threading.Lock()  # the seen set and the counters (HTTP threads and the worker)
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._counts = {"queued": 0, "done": 0, "skipped": 0, "failed": 0, "steps": 0}
        self._last_loss: float | None = None
        self.checkpoints = 0  # written by this trainer (the server closes its lineage run when any were)
        self._error: str | None = None
        self._thread = threading.Thread(target=self._work, name="online-trainer", daemon=True)
        self._thread.start()

    # ---- requests ----------------------------------------------------------------------------------
    def submit(self, examples: Sequence[Example], steps: int = 1, lr: float | None = None) -> tuple[Job, list[str]]:
        """Queue the examples not learned or waiting yet; returns the job and each example's status."""
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        statuses, fresh = [], []
        with self._state_lock:
            for ex in examples:
                if ex.id in self._seen:
                    statuses.append("skipped")
                    self._counts["skipped"] += 1
                else:
                    self._seen.add(ex.id)
                    fresh.append(ex)
                    statuses.append("queued")
            self._counts["queued"] += len(fresh)
        job = Job(fresh, steps, lr)
        if fresh:
            self._queue.put(job)
        else:
            job.done.set()
        return job, statuses

    def status(self) -> dict[str, Any]:
        return {**self._counts, "last_loss": self._last_loss, "learned": len(self.learned),
                "optimizer": {"name": "adamw", "lr": self.settings.lr, "weight_decay": self.settings.weight_decay,
                              "betas": list(self.settings.betas)},
                "parent": self.parent_hash, "weights_version": self.engine.version, "error": self._error}

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    # ---- the worker --------------------------------------------------------------------------------
    def _work(self) -> None:
        while (job := self._queue.get()) is not None:
            try:
                with self._lock:
                    self._train(job)
                    self.learned.extend(ex.record() for ex in job.examples)
                    if self.engine.publishes_in_place:  # an adapter: its weights are copied in, the base never
                        self.engine.publish(self.model)
                    else:
                        self.engine.publish(copy.deepcopy(self.model))  # the copy has no hooks; grads are None
                with self._state_lock:
                    self._counts["done"] += len(job.examples)
            except Exception as exc:  # a bad update must not kill the worker: report it, let the examples retry
                job.error = self._error = f"{type(exc).__name__}: {exc}"
                with self._state_lock:
                    self._counts["failed"] += len(job.examples)
                    self._seen.difference_update(ex.id for ex in job.examples)
            finally:
                with self._state_lock:
                    self._counts["queued"] -= len(job.examples)
                job.done.set()

    def _train(self, job: Job) -> None:
        eng, rt = self.engine, self.engine.runtime
        if job.lr is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = job.lr
        lr = self.optimizer.param_groups[0]["lr"]
        pairs = [(ex.context, ex.continuation) for ex in job.examples]
        batches = [range(i, min(i + self.batch_size, len(pairs))) for i in range(0, len(pairs), self.batch_size)]
        inputs = [(continuation_batch([pairs[i] for i in b], eng.tokenizer.pad_id, eng.source.seq_len),
                   eng.channel_tensor([job.examples[i].channels for i in b])) for b in batches]
        self.model.train()
        for _ in range(job.steps):
            self.optimizer.zero_grad(set_to_none=True)
            total = 0.0
            for batch, channels in inputs:  # gradient accumulation: one step over all the call's examples
                with rt.autocast():
                    loss = per_row_loss(self.model, batch, channels, rt.device).sum() / len(pairs)
                loss.backward()
                total += float(loss.detach())
            self.optimizer.step()
            self._counts["steps"] += 1
            self._last_loss = total
            job.losses.append(total)
            self._history.append({"step": self._counts["steps"], "loss": round(total, 6), "examples": len(pairs),
                                  "lr": lr})
        self.optimizer.zero_grad(set_to_none=True)
        self.model.eval()

    # ---- checkpoints -------------------------------------------------------------------------------
    def checkpoint(self, home: str | Path, run_id: str | None = None) -> dict[str, Any]:
        """Publish the current weights + optimizer state as a model artifact and record it in lineage.

        Waits for a running update to finish (never a half-applied step). Returns the artifact's hash, path,
        parent and number of examples learned. The next checkpoint's parent is this one.
        """
        started = time.monotonic()
        with self._lock:
            weights = save(cpu_state(self.model))
            optimizer = torch_bytes(self.optimizer.state_dict())
            learned = list(self.learned)
            history = list(self._history)
        state = load(weights)  # the snapshot's tensors (no deepcopy: an adapter's frozen base would come along)
        model = self.model  # read below for its build info and parameter count only, which training never changes
        parent = self.parent_hash
        source = self.engine.source
        online = {"parent": parent, "examples": len(learned), "optimizer": self.status()["optimizer"]}
        key = hash_json({"online": parent, "weights": hash_bytes(weights), "examples": [r["id"] for r in learned]})[:32]

        def build(out: Path) -> dict[str, Any]:
            from models.checkpoint import save_model

            save_model(model, out, extra={"online": online}, state=state)
            if (out / WEIGHTS).read_bytes() != weights:  # save_model re-serialises the same state: it must agree
                raise RuntimeError("online checkpoint: the saved weights differ from the snapshot taken")
            (out / OPTIMIZER_FILE).write_bytes(optimizer)
            (out / EXAMPLES_FILE).write_text("".join(canonical_json(r) + "\n" for r in learned))
            (out / METRICS_FILE).write_text("".join(json.dumps(h) + "\n" for h in history))
            return {"meta": {"model": f"online:{source.name}", "arch": source.arch, "online": online,
                             "metrics": {"examples": float(len(learned)), "steps": float(len(history))}}}

        inputs = {k: v for k, v in (("model", parent), ("pack", source.pack_hash)) if v}
        store = ArtifactStore(Path(home) / "artifacts")
        existing = store.lookup(ONLINE_STAGE, key)  # nothing learned since the last checkpoint: the same weights
        art = existing or store.build(ONLINE_STAGE, key, build, inputs)
        _record(Lineage(Path(home) / "lineage.duckdb"), run_id, art, inputs, source.name, learned, history,
                time.monotonic() - started, cache_hit=existing is not None)
        with self._lock:
            self.checkpoints += 1
            self.parent_hash = art.content_hash
            del self._history[: len(history)]
        return {"artifact": art.content_hash, "path": art.path, "key": art.key, "parent": parent,
                "examples": len(learned), "steps": len(history)}


def _record(lineage: Lineage, run_id: str | None, art: Artifact, inputs: dict[str, str], name: str,
            learned: list[dict[str, Any]], history: list[dict[str, Any]], seconds: float, cache_hit: bool) -> None:
    """One stage row per checkpoint in the server's run: the artifact, its parent edges, what it learned."""
    run = run_id or f"serve-{uuid.uuid4().hex[:12]}"
    if not lineage.query("SELECT run_id FROM runs WHERE run_id = ?", [run]):
        lineage.start_run({"run_id": run, "flow": "serve-model", "profile_name": name, "profile_hash": "",
                           "profile_json": "{}", "code_version": ""})
    metrics = [{"key": "examples", "value": len(learned)}, {"key": "steps", "value": len(history)},
               *({"key": "loss", "value": h["loss"], "step": h["step"]} for h in history)]
    lineage.record_stage(run, {"stage": ONLINE_STAGE, "name": f"online:{name}", "key": art.key, "cache_hit": cache_hit,
                               "duration_s": seconds, "artifact": art.to_dict(), "inputs": inputs,
                               "metrics": metrics})


def parse_examples(engine: Engine, raw: Any, field: str = "examples") -> list[Example]:
    """A /train body's examples: each {"context", "continuation", "channels"?}; texts or token ids."""
    from models.engine import RequestError, continuation_ids_of

    if not isinstance(raw, list) or not raw:
        raise RequestError(field, 'expected a non-empty list of {"context", "continuation", "channels"}')
    out = []
    for i, item in enumerate(raw):
        where = f"{field}[{i}]"
        if not isinstance(item, dict):
            raise RequestError(where, 'expected {"context", "continuation", "channels"}')
        unknown = sorted(set(item) - {"context", "continuation", "channels"})
        if unknown:
            raise RequestError(f"{where}.{unknown[0]}", "unknown field; allowed: context, continuation, channels")
        context = continuation_ids_of(engine, item.get("context"), f"{where}.context", as_context=True)
        continuation = continuation_ids_of(engine, item.get("continuation"), f"{where}.continuation",
                                           as_context=False)
        channels = engine.parse_channels(item.get("channels"), f"{where}.channels")
        if len(context) + len(continuation) > engine.source.seq_len + 1:
            raise RequestError(where, f"context + continuation is {len(context) + len(continuation)} tokens; this "
                               f"model trains on at most {engine.source.seq_len + 1}")
        out.append(Example(context, continuation, channels))
    return out


__all__ = ["Example", "Job", "OnlineTrainer", "OptimizerSettings", "parse_examples"]
