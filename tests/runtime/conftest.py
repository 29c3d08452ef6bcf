"""A real redis-server for the store tests: Debian's ``redis-server`` (``make redis``) started
on a free loopback port with no persistence, waited for (PING, bounded), always terminated.
Tests that need it skip, with the reason, when the server or the ``redis`` client is missing."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time

import pytest


class RedisServer:
    def __init__(self) -> None:
        import redis

        exe = shutil.which("redis-server")
        last = ""
        for _ in range(3):  # a free port can be taken between the probe and the server's bind
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                self.port = s.getsockname()[1]
            self.log = tempfile.TemporaryFile()  # not a pipe: a full pipe would stall the server
            self.proc = subprocess.Popen(
                [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                stdout=self.log, stderr=subprocess.STDOUT)
            client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=0.5, socket_connect_timeout=0.5)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    if client.ping():
                        client.close()
                        return
                except redis.RedisError:
                    time.sleep(0.02)
            client.close()
            last = self.stop()
        raise RuntimeError(f"redis-server did not answer PING on a loopback port: {last[-500:]}")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self):
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2)

    def stop(self) -> str:
        """Terminate (then kill) the server; its output."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.seek(0)
        out = self.log.read().decode(errors="replace")
        self.log.close()
        return out


@pytest.fixture
def redis_server():
    """A fresh redis-server for one test (127.0.0.1, a free port, no persistence)."""
    pytest.importorskip("redis", reason="the redis client is not installed: pip install 'onetrans-trt[store]'")
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (make redis: Debian's redis-server)")
    server = RedisServer()
    try:
        yield server
    finally:
        server.stop()
