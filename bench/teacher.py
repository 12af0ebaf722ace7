"""Teacher client throughput against the loopback OpenAI-compatible server at a fixed artificial latency.

The ideal is `concurrency / latency` answers per second (every slot always busy, zero overhead); the
figure that matters is the achieved share of it. Goal: >= 0.9 at concurrency 32. Each call goes the
whole real path: the openai client over HTTP, the call cache (an SQLite commit per answer), the budget,
the lineage journal. The server runs in its own process so it does not share the client's GIL.

At 0.5 s per answer (a fast real model takes 1-10 s) the client should be invisible; at 0.1 s the ideal
at concurrency 32 is 320 calls/s, which shows the client's own CPU cost per call (a few ms, mostly
the HTTP stack) on a small machine.

    .venv/bin/python bench/teacher.py [--latency 0.5 0.1] [--rounds 20] [--concurrency 1 8 32]
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from corpus.call_cache import CallCache  # noqa: E402
from corpus.openai_teacher import TeacherClient  # noqa: E402
from tests.teacher_support import word_requests  # noqa: E402
from tinymars.prices import resolve_price  # noqa: E402


def settings(base_url: str, concurrency: int) -> SimpleNamespace:
    return SimpleNamespace(
        base_url=base_url, model="gpt-4o-mini", api_key_env=None, max_concurrency=concurrency, timeout_s=30.0,
        temperature=0.7, max_tokens=64, max_usd=None, requests_per_minute=None, tokens_per_minute=None,
        max_retries=2, backoff_s=0.1, backoff_max_s=1.0, max_retry_after_s=30.0, structured_output="auto",
    )


async def measure(base_url: str, concurrency: int, rounds: int, cache_dir: Path) -> tuple[float, float]:
    """(answers per second, client CPU milliseconds per call) for `rounds` calls per slot."""
    client = TeacherClient(settings(base_url, concurrency), None, CallCache(cache_dir / f"c{concurrency}.sqlite"),
                           resolve_price("gpt-4o-mini"))
    try:
        await client.answer_all(word_requests(concurrency, "warm"))  # connections open, imports done
        batch = word_requests(concurrency * rounds, f"c{concurrency}")
        t0, cpu0 = time.perf_counter(), time.process_time()
        answers = await client.answer_all(batch)
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        failed = Counter(f"{r['status']}: {r['error']}" for r in client.records if r["status"] != "ok")
        assert len(answers) == len(batch) and not failed, failed
        return len(batch) / elapsed, 1000 * cpu / len(batch)
    finally:
        await client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency", type=float, nargs="+", default=[0.5, 0.1],
                        help="seconds the server takes per answer (one server per value)")
    parser.add_argument("--rounds", type=int, default=20, help="calls per concurrency slot")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    args = parser.parse_args()
    print(f"{'latency':>7}  {'concurrency':>11}  {'ideal/s':>9}  {'achieved/s':>10}  {'ratio':>6}  "
          f"{'client cpu ms/call':>18}")
    for latency in args.latency:
        server = subprocess.Popen([sys.executable, str(ROOT / "tests" / "openai_server.py"), "--latency",
                                   str(latency)], stdout=subprocess.PIPE, text=True)
        try:
            base_url = server.stdout.readline().strip()
            with tempfile.TemporaryDirectory() as tmp:
                for c in args.concurrency:
                    achieved, cpu_ms = asyncio.run(measure(base_url, c, args.rounds, Path(tmp)))
                    ideal = c / latency
                    print(f"{latency:>6g}s  {c:>11}  {ideal:>9.1f}  {achieved:>10.1f}  {achieved / ideal:>6.3f}  "
                          f"{cpu_ms:>18.2f}", flush=True)
        finally:
            server.terminate()
            server.wait()
    print(f"goal: ratio >= 0.9 at concurrency 32 ({args.rounds} calls per slot, loopback server in its own process)")


if __name__ == "__main__":
    main()
