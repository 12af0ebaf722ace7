"""Orchestration overhead: the `tiny` iteration deployed (server + process worker) vs run directly.

Both runs are cold (fresh homes) and measured in this one invocation:
- direct: `tinymars run --profile tiny` as a subprocess (ephemeral Prefect API),
- deployed: a flow run of `iteration/iteration` created through the REST API of a real
  `prefect server`, picked up by a real process worker, timed from creation to COMPLETED.

    python bench/deploy.py
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from deploy.local import BIN, LocalPrefect  # noqa: E402


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="tinymars-bench-deploy-"))
    local = LocalPrefect(work / "prefect-home", work / "logs")
    try:
        env = {**local.env}
        env.pop("PREFECT_API_URL")
        t0 = time.perf_counter()
        subprocess.run([str(BIN / "tinymars"), "run", "--profile", "tiny", "--home", str(work / "direct")],
                       env=env, check=True, capture_output=True)
        direct = time.perf_counter() - t0

        local.start_server()
        subprocess.run([str(BIN / "tinymars"), "deploy", "--home", str(work / "deployed"), "--name", "iteration"],
                       env=local.env, check=True, capture_output=True)
        local.start_worker("tinymars-cpu")
        t0 = time.perf_counter()
        run = local.run_deployment("iteration/iteration", {"profile": "tiny", "home": str(work / "deployed")})
        deployed = time.perf_counter() - t0
        assert run["state"]["type"] == "COMPLETED", run["state"]
    finally:
        local.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(f"tiny iteration: direct {direct:.1f}s, deployed {deployed:.1f}s, "
          f"deployed/direct = {deployed / direct:.2f} (orchestration overhead {deployed - direct:+.1f}s)")
    print(json.dumps({"direct_s": round(direct, 2), "deployed_s": round(deployed, 2),
                      "deployed_over_direct": round(deployed / direct, 3)}))


if __name__ == "__main__":
    main()
