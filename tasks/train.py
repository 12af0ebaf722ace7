"""Train stage: one model (native or baseline) on the packed shards; one cached artifact per model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.common import artifact_of, logger, resolve_device, run_stage
from tinymars.profile import ModelSpec, Profile


def model_spec(profile: Profile, spec: ModelSpec) -> dict[str, Any]:
    """The registry spec of one model: its profile entry plus the channel token count it injects."""
    out = spec.model_dump(mode="json", exclude={"name"})
    if spec.arch == "native":
        out["channel_tokens"] = next(iter(profile.channels.enabled.values())).tokens
    return out


@task(name="train", cache_policy=NO_CACHE, retries=1)
def train_task(
    profile: Profile, home: str, pack: dict[str, Any], spec: ModelSpec, force: bool = False
) -> dict[str, Any]:
    pack_art = artifact_of(pack)
    registry_spec = model_spec(profile, spec)
    section = {"train": profile.train.shared(), "model": registry_spec}

    def build(out: Path) -> dict[str, Any]:
        from models.data import load_split
        from models.registry import build as build_model
        from models.registry import count_params
        from models.trainer import TrainConfig, train

        meta = json.loads(pack_art.file("pack.json").read_text())
        shard = lambda split: [Path(pack_art.path) / n for n in meta["shards"][split]]  # noqa: E731
        t = profile.train
        model = build_model(
            registry_spec,
            vocab_size=meta["vocab_size"],
            seq_len=meta["seq_len"],
            channel_names=tuple(meta["channel_names"]),
            channel_dim=meta["channel_dim"],
            seed=t.seed,
        )
        n_params = count_params(model)
        log = logger()
        log.info(f"[train:{spec.name}] {spec.arch} {n_params:,} parameters, {t.steps} steps of {t.batch_size}")
        cfg = TrainConfig(
            steps=t.steps, batch_size=t.batch_size, lr=t.lr, min_lr_frac=t.min_lr_frac,
            warmup_steps=t.warmup_steps, weight_decay=t.weight_decay, grad_clip=t.grad_clip,
            log_every=t.log_every, eval_every=t.eval_every, seed=t.seed, channel_dropout=t.channel_dropout,
            channel_dropout_warmup=t.warmup_steps, gate_lr_mult=t.gate_lr_mult,
            device=resolve_device(t.device),
        )
        summary = train(
            model, load_split(shard("train")), load_split(shard("heldout")), cfg, out,
            pad_id=meta["pad_id"], log=lambda line: log.info(f"[train:{spec.name}] {line}"),
        )
        metrics = {k: v for k, v in summary.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        metrics["num_params"] = n_params
        sec_per_step = summary.get("timing", {}).get("sec_per_step")
        if sec_per_step:  # wall-clock: lives in lineage and the manifest, never in the hashed files
            metrics["sec_per_step"] = sec_per_step
            metrics["tok_per_s"] = t.batch_size * meta["seq_len"] / sec_per_step
        return {"meta": {"metrics": metrics, "model": spec.name, "arch": spec.arch}}

    return run_stage("train", home, section, {"pack": pack_art}, build, force, name=f"train:{spec.name}")
