"""A Prefect server and process workers on this machine, started and stopped as one unit.

Used by the deployment tests and bench/deploy.py; a user runs the same commands by hand
(deploy/README.md). Every process is started in its own session so that stopping it also
stops the flow-run subprocesses a worker spawned.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalPrefect:
    def __init__(self, prefect_home: Path, log_dir: Path, extra_env: dict[str, str] | None = None,
                 api_url: str | None = None):
        """`api_url`: workers for a server that is already running (then do not call start_server)."""
        self.port = free_port()
        self.api_url = api_url or f"http://127.0.0.1:{self.port}/api"
        self.log_dir = log_dir
        self.env = {
            **os.environ,
            "PREFECT_HOME": str(prefect_home),
            "PREFECT_API_URL": self.api_url,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_UI_ENABLED": "false",
            "PREFECT_LOGGING_LEVEL": "INFO",
            "HF_HUB_OFFLINE": "1",
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            **(extra_env or {}),
        }
        self.procs: list[subprocess.Popen] = []

    def _spawn(self, name: str, cmd: list[str]) -> subprocess.Popen:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_dir / f"{name}.log", "wb")  # noqa: SIM115 - lives as long as the process
        proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def start_server(self, timeout_s: float = 120) -> None:
        self._spawn("server", [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
                               "--port", str(self.port), "--no-ui"])
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.api_url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.procs[0].poll() is not None:
                break
            time.sleep(0.5)
        raise RuntimeError(f"prefect server did not become healthy; see {self.log_dir / 'server.log'}")

    def start_worker(self, pool: str) -> None:
        self._spawn(f"worker-{pool}", [str(BIN / "prefect"), "worker", "start", "--pool", pool,
                                       "--type", "process", "--prefetch-seconds", "5"])

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    continue
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        self.procs.clear()

    # ---------------------------------------------------------------- REST helpers
    def _request(self, method: str, path: str, body: dict | None = None, attempts: int = 6):
        """One API call; a busy server (SQLite-backed, 2 cores) may answer 5xx or drop a connection for a
        moment, so those are retried with backoff; a 4xx is a real answer and raised at once."""
        for attempt in range(attempts):
            try:
                r = httpx.request(method, f"{self.api_url}{path}", json=body, timeout=30)
                if r.status_code < 500:
                    r.raise_for_status()
                    return r.json()
                error: Exception = httpx.HTTPStatusError(f"{r.status_code} from {path}: {r.text[:300]}",
                                                         request=r.request, response=r)
            except httpx.TransportError as exc:
                error = exc
            if attempt == attempts - 1:
                raise error
            time.sleep(0.5 * 2**attempt)
        raise AssertionError("unreachable")

    def get(self, path: str) -> dict:
        return self._request("GET", path)

    def post(self, path: str, body: dict) -> dict | list:
        return self._request("POST", path, body)

    def deployment(self, full_name: str) -> dict:
        return self.get(f"/deployments/name/{full_name}")

    def run_deployment(self, full_name: str, parameters: dict, timeout_s: float = 600) -> dict:
        """Create a flow run of a deployment and wait until it is final; returns the flow run."""
        dep = self.deployment(full_name)
        run = self.post(f"/deployments/{dep['id']}/create_flow_run", {"parameters": parameters})
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            run = self.get(f"/flow_runs/{run['id']}")
            if run["state"] and run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                return run
            time.sleep(1)
        raise TimeoutError(f"flow run {run['id']} of {full_name} not final after {timeout_s}s")
