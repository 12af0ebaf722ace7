"""Generate stage: every arm's responses on the held-out rows, and the measurements that need the model.

The artifact is everything the score stage (and `tinymars score`) needs from the model, and nothing
that depends on the statistics, so a re-scoring never regenerates:
- `generations.jsonl`: one record per (row, arm, turn), sorted keys (scorers.evaluate documents it);
- `measurements.json`: held-out losses per model (relief valve), the ReZero gates, and how the STEER arm
  was injected.

Key: the eval section's generation fields (`EvalSection.generation()`: model, arms, decoding, follow-up
turns, and `weights`: every model is loaded with its best or last weights, models.checkpoint.weights_folder),
the resolved evaluated model, the resolved eval device kind (bf16 on an accelerator changes a greedy token now and
then; `auto` and the kind it resolves to share a key), the steer arm's injection
settings when it runs, the inputs' content hashes and the libraries that shape the responses
(tasks.common.STAGE_LIBRARIES).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from corpus.channels import load_channels
from corpus.rows import read_rows
from tasks.common import artifact_of, logger, run_stage, stage_progress
from tinymars.profile import Profile

GENERATIONS = "generations.jsonl"
MEASUREMENTS = "measurements.json"




def generate_key_section(profile: Profile, model: str | None = None) -> dict[str, Any]:
    """The part of the profile the responses depend on (and nothing the scorers read). `model`: one of the
    evaluated models (default: eval.model's); eval.models and an unused crosstalk switch leave the key as it was."""
    from models.generate import eval_kind

    target = model or profile.eval_model()
    section = {**profile.eval.generation(), "model": target,
               "device": eval_kind(profile.eval.device, profile.train.device)}
    section.pop("models", None)
    if not runs_crosstalk(profile, target):
        section.pop("crosstalk", None)
    reads = profile.model_channels(target)
    if reads != profile.channels.names:  # a channel subset answers its own capabilities' prompts only
        section["capabilities"] = list(reads)
    if "steer" in profile.eval.arms:
        section["steer_arm"] = {"arm_layer": profile.steering.arm_layer, "multiplier": profile.steering.multiplier}
    return section


def runs_crosstalk(profile: Profile, model: str) -> bool:
    """Crosstalk is generated for eval.model's (the integrated) model when eval.crosstalk is on."""
    return profile.eval.crosstalk and model == profile.eval_model()


@task(name="generate", cache_policy=NO_CACHE)
def generate_task(
    profile: Profile,
    home: str,
    corpus: dict[str, Any],
    channels: dict[str, Any],
    tokenizer: dict[str, Any],
    pack: dict[str, Any],
    trained: dict[str, dict[str, Any]],
    steer: dict[str, Any] | None = None,
    force: bool = False,
    model: str | None = None,
) -> dict[str, Any]:
    section = profile.eval
    target = model or profile.eval_model()
    reads = profile.model_channels(target)
    steering = "steer" in section.arms
    if steering and steer is None:
        raise ValueError("eval.arms lists 'steer' but no steer artifact was built; set steering.enabled: true "
                         "or remove 'steer' from eval.arms")
    inputs = {
        "corpus": artifact_of(corpus), "channels": artifact_of(channels),
        "tokenizer": artifact_of(tokenizer), "pack": artifact_of(pack),
        **{f"model:{name}": artifact_of(res) for name, res in sorted(trained.items())},
        **({"steer": artifact_of(steer)} if steering else {}),
    }

    def build(out: Path) -> dict[str, Any]:
        import torch

        from corpus.tokenizer import load_tokenizer
        from models.checkpoint import load_model, weights_folder
        from models.data import load_split, sample_rows
        from models.eval_arms import generate_arms, select_eval_rows
        from models.generate import Sampling, eval_kind, eval_runtime
        from models.measure import gate_summary, relief_losses
        from models.steer_hook import load_steer_arm
        from scorers.io import CROSSTALK, write_json, write_jsonl

        log = logger()
        rt = eval_runtime(eval_kind(section.device, profile.train.device))
        log.info(f"[generate] on {rt.device_name} ({'bf16 autocast' if rt.bf16 else 'fp32'})")
        torch.manual_seed(0)
        rows = read_rows(inputs["corpus"].file("corpus.jsonl"))
        mats = load_channels(Path(inputs["channels"].path))
        tok = load_tokenizer(inputs["tokenizer"].path)  # ours, or an adapter base's own (tokenizer.kind hf)
        meta = json.loads(inputs["pack"].file("pack.json").read_text())
        # the evaluated model and the models its relief valve compares it with; a model evaluated by its own
        # generate stage (eval.model and eval.models: the organ experiment's natives) is measured there
        own_stage = {profile.eval_model(), *(profile.eval.models or [])} - {target}
        needed = [name for name in trained if name not in own_stage]
        folders = {name: weights_folder(inputs[f"model:{name}"].path, section.weights) for name in needed}
        for name, (_, which) in sorted(folders.items()):
            log.info(f"[generate] {name}: {which} weights (eval.weights: {section.weights})")
        models = {name: load_model(folder) for name, (folder, _) in folders.items()}

        index = [i for i in select_eval_rows(rows, section.max_prompts_per_capability)
                 if rows[i]["capability"] in reads]
        s = section.sampling
        arm = load_steer_arm(Path(inputs["steer"].path), profile.steering.arm_layer,
                             profile.steering.multiplier) if steering else None
        if arm is not None:
            log.info(f"[generate] steer arm: layer {arm.layer} ({arm.layer_rule}), multiplier {arm.multiplier}, "
                     f"method {arm.method}, layer norm {arm.layer_norm:.2f}")
        with stage_progress("[generate] responses", None, "resp") as responses:
            records = generate_arms(
                models[target].to(rt.device), tok, rows, mats, meta["channel_names"], meta["channel_dim"], index,
                list(section.arms), section.max_new_tokens, section.batch_size,
                progress=lambda m: log.info(f"[generate] {m}"),
                sampling=Sampling(temperature=s.temperature, top_k=s.top_k, seed=s.seed),
                fixed_shape=section.fixed_shape, followup_turns=section.followup_turns,
                followup=section.followup_prompt, steer=arm, runtime=rt, on_progress=responses,
            )
        if runs_crosstalk(profile, target):
            from models.crosstalk import generate_crosstalk

            log.info("[generate] crosstalk: each channel at two states on the other capabilities' prompts")
            write_jsonl(out / CROSSTALK, generate_crosstalk(
                models[target], tok, rows, mats, meta["channel_names"], meta["channel_dim"], index, list(reads),
                section.max_new_tokens, section.batch_size, fixed_shape=section.fixed_shape, runtime=rt,
                sampling=Sampling(temperature=s.temperature, top_k=s.top_k, seed=s.seed)))
        models[target].cpu()  # the relief pass below places one model at a time
        write_jsonl(out / GENERATIONS, records)

        log.info("[generate] relief valve: held-out target loss per model")
        heldout = load_split([Path(inputs["pack"].path) / n for n in meta["shards"]["heldout"]])
        heldout = sample_rows(heldout, section.max_heldout_rows, section.sampling.seed)
        relief = relief_losses(models, heldout, section.batch_size, meta["seq_len"], meta["pad_id"], runtime=rt)
        gates = gate_summary(models[target], getattr(getattr(models[target], "cfg", None), "channel_names",
                                                          meta["channel_names"]))
        write_json(out / MEASUREMENTS, {"model": target, "relief": relief, "gates": gates,
                                        **({"steer": arm.describe()} if arm is not None else {})})
        return {"rows": len(records), "meta": {"metrics": {"generations": len(records)}}}

    return run_stage("generate", home, generate_key_section(profile, target), inputs, build, force,
                     name=None if model is None else f"generate:{target}")
