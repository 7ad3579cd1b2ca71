"""A real `edgetok serve` in a subprocess on a free loopback port, and raw HTTP to it."""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

START_S = 180  # imports and the load, on a busy 2-core machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`edgetok serve MODEL ARGS --port P`, running until stop(); its stderr in `log`."""

    def __init__(self, model, *args, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self._err = open(log, "wb")
        cmd = [sys.executable, "-c", "from edgetok.cli import main; main()", "serve", str(model), *map(str, args),
               "--port", str(self.port)]
        self.process = subprocess.Popen(cmd, stdout=self._err, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"edgetok serve exited with {self.process.returncode}: {log.read_text()}")
            try:
                if request(self.port, "GET", "/health")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        raise AssertionError(f"edgetok serve did not become healthy: {log.read_text()}")

    def stop(self) -> int:
        self.process.terminate()
        try:
            rc = self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            rc = self.process.wait()
        self._err.close()
        return rc

    def metric(self, name: str, key: str | None = None) -> float:
        status, _, body = request(self.port, "GET", "/metrics", headers=self.auth(key))
        assert status == 200, body
        for line in body.decode().splitlines():
            if line.startswith(f"edgetok_{name} "):
                return float(line.split()[-1])
        raise AssertionError(f"no metric {name}")

    @staticmethod
    def auth(key: str | None) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"} if key else {}


def request(port: int, method: str, path: str, body: bytes | dict | None = None, headers: dict | None = None,
            timeout: float = 120) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of one request."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()
