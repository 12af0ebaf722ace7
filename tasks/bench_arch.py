"""Architecture-benchmark tasks: train one model for a wall-clock budget; write the table, plot and Prefect artifact.

Not cached and not retried: a benchmark measures time, and a rerun is a new measurement. The packed
data comes from the iteration's own cached stages (`flows.bench_arch` runs the iteration to `pack`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from models.bench_arch import check_budget, resolve_models, table_rows
from tasks.common import logger
from tinymars.artifacts import Artifact, verify
from tinymars.lineage import Lineage
from tinymars.profile import Profile

TABLE_KEY = "tinymars-bench-arch"


def check_inputs(profile: Profile, items: list[str | dict[str, Any]], minutes: float, eval_points: int) -> None:
    """Everything the flow can check before any work: the budget, and that every model resolves and builds."""
    check_budget(minutes, eval_points)
    resolve_models(profile, items)


def pack_artifact(home: str, content_hash: str) -> Artifact:
    """The pack artifact an iteration run recorded, re-verified against its manifest before use."""
    row = Lineage(Path(home) / "lineage.duckdb").artifact(content_hash)
    return verify(Path(row["path"]))


@task(name="bench-arch-model", cache_policy=NO_CACHE)
def bench_model_task(profile: Profile, home: str, pack_hash: str, item: str | dict[str, Any], budget_s: float,
                     eval_points: int, out_dir: str) -> dict[str, Any]:
    from models.bench_arch import bench_model, bench_recipe
    from models.controls import apply_channel_control
    from models.data import load_split
    from models.distributed import resolve_kind

    pack = pack_artifact(home, pack_hash)
    meta = json.loads(pack.file("pack.json").read_text())
    (name, spec), = resolve_models(profile, [item], meta).items()
    rows = {split: load_split([pack.file(n) for n in meta["shards"][split]], meta["channel_dim"])
            for split in ("train", "heldout")}
    cfg = bench_recipe(profile.train.recipe().model_copy(update={"device": resolve_kind(profile.train.device)}))
    rows["train"] = apply_channel_control(rows["train"], cfg)  # the negative control benchmarks as it trains
    log = logger()
    log.info(f"[bench-arch:{name}] {spec['arch']}: {budget_s:g}s of training on {cfg.device}")
    result = bench_model(name, spec, rows["train"], rows["heldout"], meta, cfg, Path(out_dir) / "models" / name,
                         budget_s, eval_points, lambda line: log.info(f"[bench-arch:{name}] {line}"))
    log.info(f"[bench-arch:{name}] {result['steps']} steps, val_loss {result['val_loss']:.4f}, "
             f"val_bpb {result['val_bpb']:.4f}, {result['tok_per_s']:,.0f} tok/s")
    return result


@task(name="bench-arch-results", cache_policy=NO_CACHE)
def write_results_task(results: list[dict[str, Any]], out_dir: str, context: dict[str, Any]) -> dict[str, Any]:
    """results.json, the plot and the Prefect table artifact; returns their paths and the table."""
    from models.bench_arch import write_results

    paths = write_results(Path(out_dir), results, context)
    table = table_rows(results)
    create_table_artifact(key=TABLE_KEY, table=table,
                          description=f"architecture benchmark: profile {context['profile']}, "
                                      f"{context['minutes']} min per model; plot {paths['plot']}")
    return {"table": table, **paths}
