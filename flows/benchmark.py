"""Benchmark flow: a cold iteration vs a warm rerun in a scratch home, reported as a table artifact."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

from flows.iteration import iteration


@flow(name="benchmark", log_prints=True)
def benchmark(profile: str = "tiny") -> dict[str, Any]:
    log = get_run_logger()
    home = Path(tempfile.mkdtemp(prefix="tinymars-bench-"))
    try:
        t0 = time.perf_counter()
        iteration(profile=profile, home=str(home))
        cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        warm_out = iteration(profile=profile, home=str(home))
        warm = time.perf_counter() - t0
    finally:
        shutil.rmtree(home, ignore_errors=True)
    hits = sum(s["cache_hit"] for s in warm_out["stages"])
    row = {"profile": profile, "cold_s": round(cold, 2), "warm_s": round(warm, 2),
           "warm_over_cold": round(warm / cold, 4), "warm_cache_hits": hits, "stages": len(warm_out["stages"])}
    create_table_artifact(key="tinymars-benchmark", table=[row], description="cold run vs warm rerun")
    log.info(f"cold {cold:.1f}s, warm {warm:.1f}s, warm/cold {warm / cold:.3f}")
    return row
