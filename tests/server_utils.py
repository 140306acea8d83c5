"""Run a real `qwenserve serve` process for end-to-end tests (demo model, free port).

Used by the test_api_* modules and the qwen-code e2e test; each module starts one server
through a module-scoped fixture. Nothing here mocks the engine.
"""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
FIXTURES = Path(
    os.environ.get("QWENSERVE_FIXTURES_DIR", REPO / "tests" / "fixtures" / "qwen-code-0.24.4")
)
STARTUP_TIMEOUT = float(os.environ.get("QWENSERVE_TEST_STARTUP_TIMEOUT", "240"))


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A `python -m qwenserve serve` child process with its log captured to a file."""

    def __init__(
        self,
        log_dir: Path,
        *args: str,
        env: dict[str, str] | None = None,
        api_key: str | None = None,
        preexec_fn: Any = None,
    ):
        self.port = free_port()
        self.api_key = api_key
        self.log_path = log_dir / f"qwenserve-{self.port}.log"
        # QWENSERVE_TEST_SERVE_ARGS (e.g. "--model DIR") points the tests at another checkpoint.
        extra = shlex.split(os.environ.get("QWENSERVE_TEST_SERVE_ARGS", ""))
        cmd = [sys.executable, "-m", "qwenserve", "serve", "--port", str(self.port), *extra, *args]
        if api_key:
            cmd += ["--api-key", api_key]
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            cmd, stdout=self._log, stderr=subprocess.STDOUT, env=full_env, cwd=REPO, preexec_fn=preexec_fn
        )
        self.early_responses: list[tuple[str, int, dict[str, str]]] = []

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = STARTUP_TIMEOUT) -> None:
        """Poll /health until 200; records what the server said while loading."""
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=5) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"qwenserve exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
                try:
                    health = client.get(f"{self.base_url}/health")
                except httpx.TransportError:
                    time.sleep(0.05)
                    continue
                if health.status_code == 200:
                    return
                models = client.get(f"{self.base_url}/v1/models", headers=self.headers)
                self.early_responses.append(("/health", health.status_code, dict(health.headers)))
                self.early_responses.append(("/v1/models", models.status_code, dict(models.headers)))
                time.sleep(0.05)
        raise TimeoutError(f"qwenserve not ready after {timeout}s:\n{self.log()[-4000:]}")

    def get(self, path: str, **kw: Any) -> httpx.Response:
        return httpx.get(self.base_url + path, headers=self.headers, timeout=60, **kw)

    def post(self, path: str, **kw: Any) -> httpx.Response:
        headers = {**self.headers, **kw.pop("headers", {})}
        return httpx.post(self.base_url + path, headers=headers, timeout=kw.pop("timeout", 120), **kw)

    def metrics(self) -> dict[str, float]:
        """Unlabelled series of /metrics as name -> value."""
        out = {}
        for line in self.get("/metrics").text.splitlines():
            if line and not line.startswith("#") and "{" not in line:
                name, _, value = line.partition(" ")
                out[name] = float(value)
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def start_server(log_dir: Path, *args: str, **kw: Any) -> ServerProcess:
    """Start a server and wait until it is ready (stopping it if it never gets there)."""
    server = ServerProcess(log_dir, *args, **kw)
    try:
        server.wait_ready()
    except BaseException:
        server.stop()
        raise
    return server


def load_fixture(name: str) -> dict[str, Any]:
    """One of the real qwen-code request bodies."""
    import json

    return json.loads((FIXTURES / name).read_text())
