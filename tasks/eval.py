"""Eval stage: MARS vs ABLATED generations on held-out rows, scored objectively; relief-valve losses."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.channels import load_channels
from tasks.common import artifact_of, logger, run_stage
from tasks.corpus import read_rows
from tinymars.profile import Profile


@task(name="eval", cache_policy=NO_CACHE)
def eval_task(
    profile: Profile,
    home: str,
    corpus: dict[str, Any],
    channels: dict[str, Any],
    tokenizer: dict[str, Any],
    pack: dict[str, Any],
    trained: dict[str, dict[str, Any]],
    force: bool = False,
) -> dict[str, Any]:
    section = profile.eval
    target = profile.eval_model()
    inputs = {
        "corpus": artifact_of(corpus), "channels": artifact_of(channels),
        "tokenizer": artifact_of(tokenizer), "pack": artifact_of(pack),
        **{f"model:{name}": artifact_of(res) for name, res in sorted(trained.items())},
    }

    def build(out: Path) -> dict[str, Any]:
        import torch

        from corpus.tokenizer import Tokenizer
        from models.data import load_split
        from models.eval_arms import generate_arms, select_eval_rows
        from models.trainer import heldout_loss, load_model
        from scorers.evaluate import score_generations

        log = logger()
        torch.manual_seed(0)
        rows = read_rows(inputs["corpus"].file("corpus.jsonl"))
        mats = load_channels(Path(inputs["channels"].path))
        tok = Tokenizer(inputs["tokenizer"].file("tokenizer.model"))
        meta = json.loads(inputs["pack"].file("pack.json").read_text())
        models = {name: load_model(Path(inputs[f"model:{name}"].path)) for name in trained}

        index = select_eval_rows(rows, section.max_prompts_per_capability)
        records = generate_arms(
            models[target], tok, rows, mats, meta["channel_names"], meta["channel_dim"], index,
            list(section.arms), section.max_new_tokens, section.batch_size,
            progress=lambda m: log.info(f"[eval] {m}"),
        )
        with open(out / "generations.jsonl", "w", encoding="utf-8") as f:
            for rec in records:
                f.write(json.dumps(rec, ensure_ascii=False, sort_keys=True) + "\n")
        scores = score_generations(records, alpha=section.alpha)

        log.info("[eval] relief valve: held-out target loss per model")
        heldout = load_split([Path(inputs["pack"].path) / n for n in meta["shards"]["heldout"]])
        relief = {}
        for name, model in sorted(models.items()):
            kw = dict(batch_size=section.batch_size, seq_len=meta["seq_len"], pad_id=meta["pad_id"])
            relief[name] = {"channels_zeroed": heldout_loss(model, heldout, zero_channels=True, **kw)}
            if getattr(model, "gate_values", None) is not None and meta["channel_names"]:
                relief[name]["channels_on"] = heldout_loss(model, heldout, zero_channels=False, **kw)
        gates = {}
        m = models[target]
        if hasattr(m, "gate_values"):
            g = m.gate_values()
            gates = {"alpha_l2": float(m.alpha_l2()), "channel_names": meta["channel_names"],
                     "per_layer": [[round(float(x), 6) for x in layer] for layer in g.tolist()]}
        result = {"model": target, "capabilities": scores, "relief": relief, "gates": gates,
                  "n_records": len(records)}
        (out / "scores.json").write_text(json.dumps(result, indent=1, sort_keys=True))
        return {"rows": len(records), "meta": {"metrics": _headline(scores, relief, target)}}

    return run_stage("eval", home, profile.section("eval"), inputs, build, force)


def _headline(scores: dict[str, Any], relief: dict[str, Any], target: str) -> dict[str, float]:
    """Flat numbers for the lineage metrics table (the full tables stay in scores.json)."""
    out: dict[str, float] = {}
    for cap, s in scores.items():
        for k, v in (s if isinstance(s, dict) else {}).items():
            if isinstance(v, int | float) and not isinstance(v, bool):
                out[f"{cap}.{k}"] = float(v)
    for name, r in relief.items():
        out[f"relief.{name}.zeroed_nats"] = float(r["channels_zeroed"]["nats_per_token"])
    return out
