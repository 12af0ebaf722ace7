"""Run `tinymars run` so that no process it started can outlive it, even after a SIGKILL.

Why: with no Prefect API configured, Prefect starts a temporary API server (uvicorn) as a child
of the flow process and stops it on exit. A SIGKILLed process runs no exit code, so a `kill -9`
of `tinymars run` would leave that server running forever.

How: the `tinymars run` the user started (the supervisor) re-runs the same command line as a
worker in a new process group, and holds the write end of a pipe the worker reads. The worker
watches that pipe from a thread: end-of-file means the supervisor is gone (however it died), and
the worker then SIGKILLs its whole group, itself and the server included. When the worker ends
first, the supervisor kills whatever is left in the group. Ctrl-C and SIGTERM reach the
supervisor and are forwarded to the worker, which stops the flow as it always does. Trainers run
in their own session and stop by themselves once the process that launched them is gone
(models.train_cli).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

WORKER_FD_ENV = "TINYMARS_SUPERVISOR_FD"
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def is_worker() -> bool:
    return WORKER_FD_ENV in os.environ


def needs_supervisor() -> bool:
    """True when the flow would start Prefect's temporary server (no API URL configured) in this process."""
    if is_worker() or os.environ.get("PREFECT_API_URL"):
        return False
    from prefect.settings import get_current_settings  # also sees Prefect profiles and harness settings

    return not get_current_settings().api.url


def run_supervised(argv: list[str]) -> int:
    """Run `tinymars ARGV` as a worker in its own process group; return its exit code (128+N for signal N)."""
    read_end, write_end = os.pipe()
    worker = subprocess.Popen([sys.executable, "-m", "app.cli", *argv], pass_fds=(read_end,),
                              env={**os.environ, WORKER_FD_ENV: str(read_end)}, start_new_session=True)
    os.close(read_end)
    previous = {sig: signal.signal(sig, lambda s, _f: _send(worker.pid, s)) for sig in FORWARDED}
    try:
        code = worker.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _kill_group(worker.pid)  # anything the worker left behind (it ended, or was killed by itself)
        os.close(write_end)
    return code if code >= 0 else 128 - code


def watch_supervisor() -> None:
    """In the worker: SIGKILL this process group as soon as the supervisor's end of the pipe closes."""
    fd = int(os.environ.pop(WORKER_FD_ENV))

    def wait_for_eof() -> None:
        try:
            while os.read(fd, 1):
                pass
        except OSError:
            pass
        _kill_group(os.getpgrp())

    threading.Thread(target=wait_for_eof, name="tinymars-supervisor-watch", daemon=True).start()


def _send(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
