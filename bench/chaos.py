"""Kill-anywhere at scale: SIGKILL `tinymars run` at many seeded points, rerun, compare with an uninterrupted run.

    python bench/chaos.py --kills 100 [--seed N]

Prints every kill point, then the figures: kill points survived, stages hit mid-build, reruns, runs
that resumed training from a checkpoint, total time, and whether the final artifacts are byte-identical
(non-volatile files) to the uninterrupted run's. Starts its own Prefect server (one for all runs).
"""

from __future__ import annotations

import argparse
import random
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests import chaos_support as cs  # noqa: E402
from tinymars.stages import ORDER  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=100)
    ap.add_argument("--seed", type=int, default=random.SystemRandom().randrange(1 << 31))
    args = ap.parse_args()
    print(f"seed {args.seed}, {args.kills} kill points, profile '{cs.PROFILE}'")
    from prefect.server.api.server import SubprocessASGIServer

    work = Path(tempfile.mkdtemp(prefix="tinymars-chaos-"))
    server = SubprocessASGIServer()
    server.start(timeout=180)
    zygote = cs.Zygote(cs.run_env(server.api_url))
    try:
        t0 = time.monotonic()
        reference = cs.complete_home(zygote, work)
        t_reference = time.monotonic() - t0
        home, stages, outcomes = work / "chaos", list(ORDER), []
        t1 = time.monotonic()
        for i, point in enumerate(cs.plan(args.seed, stages, args.kills, cs.stage_seconds(reference))):
            o = cs.kill_at(zygote, home, work / f"kill-{i:03d}.log", point, stages)
            outcomes.append(o)
            print(f"kill {i:3d}: {point.stage:<9} {point.trigger:<4} +{point.delay_s:.3f}s -> exit {o.code:>3}, "
                  f"mid-build of {o.landed_in or '-':<9} {o.seconds:5.1f}s", flush=True)
        cs.run_to_end(zygote, home, work / "final.log")
        t_chaos = time.monotonic() - t1
        expected, got = cs.final_artifacts(reference), cs.final_artifacts(home)
        identical = set(expected) == set(got) and all(
            cs.stable_files(Path(got[n]["path"])) == cs.stable_files(Path(expected[n]["path"])) for n in expected)
        killed = [o for o in outcomes if o.code == -signal.SIGKILL]
        resumed = sum("resumed from" in p.read_text() for p in work.glob("*.log"))
        hits = Counter(o.landed_in or "between stages" for o in killed)
        print(f"\nkill points survived: {len(killed)} of {len(outcomes)} (the rest finished before their point)")
        print("stages hit mid-build: " + ", ".join(f"{s} {n}" for s, n in sorted(hits.items())))
        print(f"reruns: {len(outcomes) + 1}; runs that resumed training from a checkpoint: {resumed}")
        print(f"final artifacts byte-identical to the uninterrupted run (non-volatile files): {identical}")
        print(f"time: uninterrupted run {t_reference:.1f}s; kills + reruns {t_chaos:.1f}s "
              f"({t_chaos / max(len(outcomes), 1):.1f}s per kill point)")
        print(f"work folder: {work}")
        return 0 if identical else 1
    finally:
        zygote.close()
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
