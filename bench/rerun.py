"""Cold run vs warm rerun of one iteration, measured side by side in one invocation.

Each run is a real `tinymars run` subprocess (CLI start-up, Prefect ephemeral API, every stage
lookup re-hashing its files), so the ratio is what a researcher sees when nothing changed.

    python bench/rerun.py [--profile tiny|smoke|PATH] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def timed_run(profile: str, home: Path, env: dict[str, str]) -> tuple[float, str]:
    exe = Path(sys.executable).with_name("tinymars")
    t0 = time.perf_counter()
    proc = subprocess.run([str(exe), "run", "--profile", profile, "--home", str(home)], env=env,
                          capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"tinymars run failed with exit code {proc.returncode}")
    return elapsed, proc.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="tiny")
    ap.add_argument("--keep", action="store_true", help="keep the temporary home folder")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tinymars-bench-"))
    env = {**os.environ, "PREFECT_HOME": str(work / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "HF_HUB_OFFLINE": "1", "PREFECT_LOGGING_LEVEL": "WARNING"}
    try:
        home = work / "home"
        cold, _ = timed_run(args.profile, home, env)
        warm, out = timed_run(args.profile, home, env)
        hits = out.count("cache hit")
        result = {"profile": args.profile, "cold_s": round(cold, 2), "warm_s": round(warm, 2),
                  "warm_over_cold": round(warm / cold, 4), "speedup": round(cold / warm, 1),
                  "warm_cache_hits": hits}
        print(f"profile {args.profile}: cold {cold:.1f}s, warm rerun {warm:.1f}s "
              f"(warm/cold = {warm / cold:.3f}, {cold / warm:.1f}x faster; {hits} stages from cache)")
        print(json.dumps(result))
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
