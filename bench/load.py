"""The teacher corpus under load: >= 10,000 calls against the loopback server with 5% injected faults
(429, 500, timeouts, malformed bodies), through the real corpus stage, call cache and lineage store.

Prints wall time, calls per second and peak memory (the process's max RSS, and with `--tracemalloc` the
peak of Python allocations, which costs ~2x in speed), plus the accounting the test checks: the server's
billed answers, lineage `teacher_calls` rows and corpus rows. The server runs in its own process (its
counts are the ground truth) at zero latency, so the figure is the client's own cost per call: HTTP stack,
call cache commits, pre-flight scoring.

    .venv/bin/python bench/load.py [--prompts 667] [--tracemalloc]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import tasks.corpus  # noqa: E402
from tests.teacher_support import (  # noqa: E402
    FAKE_KEY,
    KEY_ENV,
    LOAD_PROMPTS,
    LOAD_SERVER,
    load_calls,
    load_profile,
    server_process,
)
from tinymars.lineage import Lineage  # noqa: E402


def run_load(home: Path, prompts: int = LOAD_PROMPTS) -> dict:
    """One cold corpus build under faults; returns the figures and the server's and the stage's counts.
    The caller puts FAKE_KEY in $KEY_ENV and, outside a Prefect run, turns `tasks.corpus.teacher_gate` off."""
    with server_process(FAKE_KEY, **LOAD_SERVER) as (base_url, server_stats):
        t0, cpu0 = time.perf_counter(), time.process_time()
        result = tasks.corpus.corpus_task.fn(load_profile(base_url, prompts), str(home))
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        Lineage(home / "lineage.duckdb").record_stage("load", result)
        recorded = time.perf_counter() - t0 - wall
        stats = server_stats()
    answered = stats["answered"]
    return {"calls": load_calls(prompts), "wall_s": wall, "cpu_s": cpu, "lineage_s": recorded,
            "requests": stats["requests"], "outcomes": stats["outcomes"], "billed": sum(answered.values()),
            "max_per_key": max(answered.values()), "rows": result["artifact"]["rows"], "result": result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=LOAD_PROMPTS, help="prompts per capability (15 calls each)")
    parser.add_argument("--tracemalloc", action="store_true", help="also trace the peak of Python allocations")
    args = parser.parse_args()
    os.environ[KEY_ENV] = FAKE_KEY
    tasks.corpus.teacher_gate = contextlib.nullcontext  # no Prefect API here: the client's own limits apply
    if args.tracemalloc:
        tracemalloc.start()
    with tempfile.TemporaryDirectory(prefix="tinymars-load-") as tmp:
        out = run_load(Path(tmp) / "home", args.prompts)
        lin = Lineage(Path(tmp) / "home" / "lineage.duckdb")
        paid = lin.query("SELECT count(*) AS n FROM teacher_calls WHERE NOT cache_hit")[0]["n"]
    peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    faults = {k: v for k, v in sorted(out["outcomes"].items()) if k != "ok"}
    print(f"calls planned       {out['calls']:,}")
    print(f"HTTP requests       {out['requests']:,} ({sum(faults.values())} injected faults: {faults})")
    print(f"billed answers      {out['billed']:,} (max per call key {out['max_per_key']})")
    print(f"lineage rows        {paid:,} HTTP attempts in teacher_calls, recorded in {out['lineage_s']:.2f}s")
    print(f"corpus rows         {out['rows']:,}")
    print(f"wall time           {out['wall_s']:.1f}s  ({out['billed'] / out['wall_s']:.0f} calls/s, "
          f"{out['requests'] / out['wall_s']:.0f} requests/s, "
          f"{1000 * out['cpu_s'] / out['requests']:.1f} ms client CPU per request)")
    print(f"peak RSS            {peak_rss_mib:.0f} MiB")
    if args.tracemalloc:
        print(f"peak Python heap    {tracemalloc.get_traced_memory()[1] / 2**20:.0f} MiB (tracemalloc)")


if __name__ == "__main__":
    main()
