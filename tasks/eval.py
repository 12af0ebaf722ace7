"""Eval stage: every arm's generations on the held-out rows, the model-side measurements, and the scores.

The artifact holds everything `tinymars score` needs to reproduce the scores with no model:
- `generations.jsonl`: one record per (row, arm, turn), sorted keys (scorers.evaluate documents it);
- `settings.json`: the scoring settings the profile pre-registered (alpha, hypotheses, bootstrap seed);
- `measurements.json`: what needed the model (held-out losses per model, the ReZero gates);
- `scores.json`: `scorers.evaluate.score_all(generations, settings, measurements)`.

With the `steer` arm the steer stage's readout is an input, and the arm's injection settings
(steering.arm_layer, steering.multiplier) join the eval key: they change the generations, not the readout.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.channels import load_channels
from tasks.common import artifact_of, logger, run_stage
from tasks.corpus import read_rows
from tinymars.profile import Profile

VERDICT_CODE = {"supported": 1.0, "underpowered": 0.5, "not supported": 0.0}


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False, sort_keys=True) + "\n")


def write_json(path: Path, obj: Any) -> None:
    """Strict JSON (no NaN) in the object's own key order: the scorers build their dicts in report order
    (capabilities canonical, arms mars / ablated / text), and a re-read report must keep that order."""
    path.write_text(json.dumps(obj, indent=1, allow_nan=False) + "\n", encoding="utf-8")


def _finite(loss: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in loss.items()}


@task(name="eval", cache_policy=NO_CACHE)
def eval_task(
    profile: Profile,
    home: str,
    corpus: dict[str, Any],
    channels: dict[str, Any],
    tokenizer: dict[str, Any],
    pack: dict[str, Any],
    trained: dict[str, dict[str, Any]],
    steer: dict[str, Any] | None = None,
    force: bool = False,
) -> dict[str, Any]:
    section = profile.eval
    target = profile.eval_model()
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
    key_section = profile.section("eval")
    if steering:
        key_section["steer_arm"] = {"arm_layer": profile.steering.arm_layer, "multiplier": profile.steering.multiplier}

    def build(out: Path) -> dict[str, Any]:
        import torch

        from corpus.tokenizer import Tokenizer
        from models.data import load_split
        from models.eval_arms import generate_arms, select_eval_rows
        from models.generate import Sampling
        from models.steer_hook import load_steer_arm
        from models.trainer import heldout_loss, load_model
        from scorers.evaluate import score_all

        log = logger()
        torch.manual_seed(0)
        rows = read_rows(inputs["corpus"].file("corpus.jsonl"))
        mats = load_channels(Path(inputs["channels"].path))
        tok = Tokenizer(inputs["tokenizer"].file("tokenizer.model"))
        meta = json.loads(inputs["pack"].file("pack.json").read_text())
        models = {name: load_model(Path(inputs[f"model:{name}"].path)) for name in trained}

        index = select_eval_rows(rows, section.max_prompts_per_capability)
        s = section.sampling
        arm = load_steer_arm(Path(inputs["steer"].path), profile.steering.arm_layer,
                             profile.steering.multiplier) if steering else None
        if arm is not None:
            log.info(f"[eval] steer arm: layer {arm.layer} ({arm.layer_rule}), multiplier {arm.multiplier}, "
                     f"method {arm.method}, layer norm {arm.layer_norm:.2f}")
        records = generate_arms(
            models[target], tok, rows, mats, meta["channel_names"], meta["channel_dim"], index,
            list(section.arms), section.max_new_tokens, section.batch_size,
            progress=lambda m: log.info(f"[eval] {m}"),
            sampling=Sampling(temperature=s.temperature, top_k=s.top_k, seed=s.seed),
            fixed_shape=section.fixed_shape, followup_turns=section.followup_turns,
            followup=section.followup_prompt, steer=arm,
        )
        write_jsonl(out / "generations.jsonl", records)

        log.info("[eval] relief valve: held-out target loss per model")
        heldout = load_split([Path(inputs["pack"].path) / n for n in meta["shards"]["heldout"]])
        kw = dict(batch_size=section.batch_size, seq_len=meta["seq_len"], pad_id=meta["pad_id"])
        relief = {}
        for name, model in sorted(models.items()):
            has_channels = bool(getattr(getattr(model, "cfg", None), "has_channels", False))
            relief[name] = {"has_channels": has_channels,
                            "channels_zeroed": _finite(heldout_loss(model, heldout, zero_channels=True, **kw))}
            if has_channels:
                relief[name]["channels_on"] = _finite(heldout_loss(model, heldout, zero_channels=False, **kw))
        gates = {}
        m = models[target]
        if hasattr(m, "gate_values"):
            gates = {"alpha_l2": float(m.alpha_l2()), "channel_names": meta["channel_names"],
                     "per_layer": [[round(float(x), 6) for x in layer] for layer in m.gate_values().tolist()]}
        measurements = {"model": target, "relief": relief, "gates": gates,
                        **({"steer": arm.describe()} if arm is not None else {})}
        settings = section.scoring()
        write_json(out / "settings.json", settings)
        write_json(out / "measurements.json", measurements)
        scores = score_all(records, settings, measurements)
        write_json(out / "scores.json", scores)
        return {"rows": len(records), "meta": {"metrics": headline_metrics(scores)}}

    return run_stage("eval", home, key_section, inputs, build, force)


def headline_metrics(scores: dict[str, Any]) -> dict[str, float]:
    """Flat numbers for the lineage metrics table and `tinymars compare` (the full tables stay in scores.json)."""
    out: dict[str, float] = {}
    for cap, block in scores["capabilities"].items():
        for k, v in block.items():
            if isinstance(v, int | float) and not isinstance(v, bool):
                out[f"{cap}.{k}"] = float(v)
    for row in scores["channel_vs_text"]:
        for arm, a in row["arms"].items():
            if a["rate"] is not None:
                out[f"{row['capability']}.{row['kind']}.{arm}_rate"] = float(a["rate"])
        extra = row["tokens"].get("text_extra_prompt_tokens")
        if extra is not None:
            out[f"{row['capability']}.{row['kind']}.text_extra_prompt_tokens"] = float(extra)
    for h in scores["hypotheses"]:
        out[f"hypothesis.{h['id']}.verdict"] = VERDICT_CODE[h["verdict"]]
        for m in h["members"]:
            out[f"hypothesis.{h['id']}.{m['capability']}.p_holm"] = float(m["p_holm"])
    for name, r in scores["relief"]["models"].items():
        out[f"relief.{name}.zeroed_nats"] = float(r["channels_zeroed"]["nats_per_token"])
        if r["channels_zeroed"].get("bits_per_byte") is not None:
            out[f"relief.{name}.zeroed_bpb"] = float(r["channels_zeroed"]["bits_per_byte"])
    if scores["gates"]:
        out["gates.alpha_l2"] = float(scores["gates"]["alpha_l2"])
    return out
