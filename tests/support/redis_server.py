"""A real, throwaway redis-server for tests (the Debian package; `make redis` installs it).

Tests run against a real server rather than a fake so that timeouts, TTLs and connection loss behave as in
production. Each server gets a free loopback port, no persistence, and its own temp dir.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import redis

from tests.support.ports import free_port


class RedisServer:
    """`start()` launches redis-server and waits until it answers PING; `stop()` terminates it."""

    def __init__(self, startup_timeout_s: float = 10.0) -> None:
        self.startup_timeout_s = startup_timeout_s
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._dir = Path(tempfile.mkdtemp(prefix="specserve-redis-"))
        self._log = self._dir / "redis.log"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, port: int | None = None) -> RedisServer:
        """Start on `port` (default: a free one; a fixed port gets one attempt)."""
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server not found on PATH; run `make redis` to install it (Debian package redis-server)")
        # Another process may grab the free port between our probe and redis binding it: try a few.
        for _ in range(1 if port else 3):
            self.port = port or free_port()
            with open(self._log, "ab") as log:
                self.proc = subprocess.Popen(
                    [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                     "--dir", str(self._dir), "--daemonize", "no"],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                )  # fmt: skip
            if self._wait_ready():
                return self
        self.stop()
        pytest.fail(f"redis-server did not answer PING within {self.startup_timeout_s:.0f} s; log:\n{self._tail()}")

    def _wait_ready(self) -> bool:
        assert self.proc is not None
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.2, socket_timeout=0.5)
        deadline = time.monotonic() + self.startup_timeout_s
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    return False  # exited (e.g. port taken): caller retries on another port
                try:
                    if client.ping():
                        return True
                except redis.RedisError:
                    time.sleep(0.05)
            self.proc.kill()
            self.proc.wait()
            return False
        finally:
            client.close()

    def _tail(self) -> str:
        try:
            return "\n".join(self._log.read_text(errors="replace").splitlines()[-20:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)
