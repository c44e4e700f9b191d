"""`specserve serve` as a process of its own on a free loopback port, as a user starts it."""

import os
import subprocess
import sys
import tempfile
import time

import httpx
import pytest

from tests.support.ports import free_port

API_KEY = "sk-test-0123456789"  # the tests' shared server requires it (`--api-key`, tests/server/conftest.py)
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def start_server(
    *extra: str, healthy: bool = True, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen, str, list[int]]:
    """A `specserve serve` process on a free port; returns once /health is 200 (or, not `healthy`, once it
    answers at all), with the statuses seen. `env`: variables added to this process's environment."""
    port = free_port()
    log = tempfile.TemporaryFile()  # a file, not a pipe: a full pipe would block the server
    proc = subprocess.Popen(
        [sys.executable, "-m", "specserve.cli", "serve", "--port", str(port), "--n-ctx", "2048", *extra],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
    )
    base = f"http://127.0.0.1:{port}"
    statuses: list[int] = []
    deadline = time.time() + 600
    while time.time() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            pytest.fail(f"server exited: {log.read()[-3000:].decode(errors='replace')}")
        try:
            statuses.append(httpx.get(f"{base}/health", timeout=1).status_code)
            if statuses[-1] == 200 or not healthy:
                return proc, base, statuses
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    proc.kill()
    pytest.fail("server did not become healthy")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    proc.wait(timeout=30)
