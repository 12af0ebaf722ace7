"""Time-boxed architecture benchmark: every model gets the same packed data, recipe and wall-clock budget.

Each model is trained by the one trainer (`models.trainer.train`) with a time budget: it stops
after that many seconds of training (held-out evaluations are not counted) and evaluates the
held-out split every `budget / eval_points` training seconds and at the end, which gives the
loss-vs-time curve. The learning rate is constant after warmup (`min_lr_frac = 1`): under a time
budget the step count is unknown in advance, so a decay schedule would favour whichever model's
step time happened to match the guess.

val_bpb is the trainer's held-out bits per byte: total target-token nats / ln 2 / UTF-8 bytes of
those targets (the packer stores each row's target bytes). tok/s counts the real tokens of every
training batch (positions holding a row's token, padding excluded; models.trainer) per training
second, first step included: a model that reads packed windows and the adapter, padded one row per
sequence, are compared on the work they did.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from models.architectures import ARCHITECTURES, build, count_params
from models.data import PackedRows
from models.sizing import count_spec_params, profile_specs
from models.trainer import train
from tinymars.artifacts import write_atomic
from tinymars.profile import TrainRecipe

MAX_STEPS = 10**9  # the budget ends a run, never the step count
RESULTS, PLOT = "results.json", "loss_vs_time.png"


def check_budget(minutes: float, eval_points: int = 4) -> None:
    if not isinstance(minutes, int | float) or not math.isfinite(minutes) or minutes <= 0:
        raise ValueError(f"minutes: {minutes!r} is not a positive number of minutes per model; e.g. 0.5 or 10")
    if not isinstance(eval_points, int) or eval_points < 1:
        raise ValueError(f"eval_points: {eval_points!r}; give a whole number >= 1 (held-out evals per model)")


def resolve_models(profile: Any, items: Sequence[str | dict[str, Any]],
                   pack_meta: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Benchmark entries -> {name: registry spec}, each checked by building it on the meta device.

    An entry is a `train.models` name of the profile (its spec, bracketing resolved), the name of a
    registered architecture that needs no settings (`vocab_graph`, `vocab_conv`: their defaults), or
    a dict spec with `name` and `arch`.
    """
    if isinstance(items, str) or not items:
        raise ValueError("models: give a list of model names, e.g. native,baseline,vocab_graph,vocab_conv")
    from_profile = profile_specs(profile, pack_meta)
    meta = pack_meta or {"vocab_size": profile.tokenizer.vocab_size, "seq_len": profile.pack.seq_len,
                         "channel_names": list(profile.channels.names), "channel_dim": profile.channels.max_dim}
    build_kw = {k: meta[k] for k in ("vocab_size", "seq_len", "channel_names", "channel_dim")}
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        if isinstance(item, dict):
            name, spec = item.get("name"), {k: v for k, v in item.items() if k != "name"}
        elif item in from_profile:
            name, spec = item, from_profile[item]
        elif item in ARCHITECTURES:
            name, spec = item, {"arch": item}
        else:
            raise ValueError(f"models: unknown model '{item}'; use a train.models name of profile '{profile.name}' "
                             f"({', '.join(from_profile)}) or a registered architecture "
                             f"({', '.join(sorted(ARCHITECTURES))})")
        if not name or name in out:
            problem = "is listed twice" if name else "has no name"
            raise ValueError(f"models: '{name}' {problem}; names must be unique")
        try:
            count_spec_params(spec, **build_kw)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"models: '{name}' cannot be built ({exc}); give it a train.models entry in the "
                             "profile with its settings") from None
        out[name] = spec
    return out


def bench_recipe(recipe: TrainRecipe) -> TrainRecipe:
    """The profile's training recipe for a time-boxed run: constant LR after warmup, no step-based evals or
    checkpoints (the budget ends the run and the held-out evals come every budget / eval_points seconds)."""
    return recipe.model_copy(update={"steps": MAX_STEPS, "min_lr_frac": 1.0, "eval_every": MAX_STEPS,
                                     "checkpoint_every": 0})


def bench_model(name: str, spec: dict[str, Any], train_rows: PackedRows, heldout_rows: PackedRows,
                pack_meta: dict[str, Any], cfg: TrainRecipe, out_dir: Path, budget_s: float, eval_points: int,
                log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train one model for `budget_s` training seconds; its row of the results table, with the loss-vs-time curve."""
    model = build(spec, vocab_size=pack_meta["vocab_size"], seq_len=pack_meta["seq_len"],
                  channel_names=pack_meta["channel_names"], channel_dim=pack_meta["channel_dim"], seed=cfg.seed)
    time_box = {"time_budget_s": float(budget_s), "eval_every_s": float(budget_s) / eval_points}
    summary = train(model, train_rows, heldout_rows, cfg, out_dir, pack_meta["pad_id"], log, **time_box)
    records = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines() if line]
    curve = [{"step": r["step"], "train_s": r["train_s"], "loss": r["loss"], "val_loss": r.get("heldout_loss"),
              "val_bpb": r.get("heldout_bpb")} for r in records]
    steps, train_s = curve[-1]["step"], curve[-1]["train_s"]
    return {"name": name, "arch": spec["arch"], "spec": spec, "params": count_params(model), "steps": steps,
            "train_s": train_s, "train_loss": summary["final_loss"], "val_loss": summary["final_heldout_loss"],
            "val_bpb": summary["final_heldout_bpb"],
            "tok_per_s": summary["timing"]["real_tokens"] / max(train_s, 1e-9),
            "train_config": {**summary["train_config"], **time_box}, "curve": curve}


def table_rows(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The printed / Prefect table: one row per model, plain numbers rounded for reading."""
    def r(x: float | None, n: int) -> float | None:
        return None if x is None else round(x, n)

    return [{"model": x["name"], "arch": x["arch"], "params": x["params"], "steps": x["steps"],
             "val_loss": r(x["val_loss"], 4), "val_bpb": r(x["val_bpb"], 4), "tok_per_s": round(x["tok_per_s"]),
             "train_s": r(x["train_s"], 1)} for x in results]


def plot_curves(results: Sequence[dict[str, Any]], title: str) -> bytes:
    """PNG: held-out loss (solid, dots at the evals) and train loss (dashed) against training seconds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for i, res in enumerate(results):
        color = f"C{i % 10}"
        pts = [(p["train_s"], p["val_loss"]) for p in res["curve"] if p["val_loss"] is not None]
        ax.plot([p["train_s"] for p in res["curve"]], [p["loss"] for p in res["curve"]], "--", color=color,
                alpha=0.5, linewidth=1)
        label = f"{res['name']} ({res['params']:,} params)"
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=color, label=label)
    ax.set_xlabel("training seconds")
    ax.set_ylabel("loss (nats / target token)")
    ax.set_title(title + "  (solid: held-out, dashed: train)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def write_results(out_dir: Path, results: Sequence[dict[str, Any]], context: dict[str, Any]) -> dict[str, str]:
    """results.json (context + one entry per model, curves included) and the PNG, each written atomically."""
    out_dir = Path(out_dir)
    title = f"bench-arch: profile {context.get('profile')}, {context.get('minutes')} min per model"
    write_atomic(out_dir / PLOT, plot_curves(results, title))
    write_atomic(out_dir / RESULTS, json.dumps({**context, "models": list(results)}, indent=1, sort_keys=True))
    return {"results": str(out_dir / RESULTS), "plot": str(out_dir / PLOT)}
