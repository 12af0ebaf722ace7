"""Start `models.train_cli` as a child process tree and stream its output, line by line.

One process on CPU / one GPU; `torchrun --standalone` for several GPUs or CPU ranks (gloo); on XLA
the CLI itself starts one process per device (torch_xla.launch). The child tree runs in its own
session, so stopping it (cancel, error, a kill of the caller) stops every rank; the trainers also
exit on their own when the launching process disappears (see models.train_cli).
"""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

LAUNCHER_PID_ENV = "TINYMARS_LAUNCHER_PID"


def launch_command(job_path: str | Path, nproc: int, kind: str) -> list[str]:
    """The command line that runs a job on `nproc` processes of device kind `kind`."""
    cli = ["-m", "models.train_cli", str(job_path)]
    if nproc <= 1 or kind == "xla":
        return [sys.executable, *cli]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *cli]


def run_streaming(cmd: Sequence[str], on_line: Callable[[str], None], cwd: str | Path | None = None,
                  env: dict[str, str] | None = None, tail: int = 40) -> tuple[int, list[str]]:
    """Run `cmd`, passing each output line (stdout and stderr merged) to `on_line`; return (exit code, last lines)."""
    child_env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1", LAUNCHER_PID_ENV: str(os.getpid())}
    last: collections.deque[str] = collections.deque(maxlen=tail)
    proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            cwd=cwd, env=child_env, start_new_session=True)
    try:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.rstrip("\n")
            last.append(line)
            on_line(line)
        return proc.wait(), list(last)
    finally:
        if proc.poll() is None:  # we are being cancelled or failed mid-stream: stop the whole tree
            stop_tree(proc)


def stop_tree(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM the child's process group, then SIGKILL whatever is left after `grace_s`."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue
