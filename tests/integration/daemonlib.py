"""A real `vmshield daemon` subprocess for the tests, and an SSE reader.

The daemon is started the way a user starts it (``python -m vmshield daemon``), stopped
by its own pid (SIGTERM, or SIGKILL for the crash tests), and its log is shown when it
fails to come up.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def make_token(state: Path, tenant: str, admin: bool = False, db: str | None = None) -> str:
    """A token through the CLI, as an operator makes one."""
    cmd = [sys.executable, "-m", "vmshield", "token", "create", "--tenant", tenant]
    cmd += ["--db", db] if db else ["--state", str(state)]
    if admin:
        cmd.append("--admin")
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if res.returncode != 0:
        pytest.fail(f"token create failed: {res.stderr}")
    return res.stdout.strip()


class Daemon:
    """One daemon process on a loopback TCP port."""

    def __init__(self, state: Path, host: str = "host-a", db: str | None = None) -> None:
        self.state, self.host, self.db = state, host, db
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = state / f"daemon-{host}.log"
        self.starts = 0

    def start(self, timeout: float = 180) -> Daemon:
        self.state.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable, "-m", "vmshield", "daemon", "--state", str(self.state),
            "--listen", f"tcp:127.0.0.1:{self.port}", "--host", self.host,
        ]  # fmt: skip
        if self.db:
            cmd += ["--db", self.db]
        self.starts += 1
        with self.log.open("ab") as log:
            log.write(f"--- start {self.starts}\n".encode())
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"daemon exited ({self.proc.returncode}):\n{self.log.read_text()}")
            try:
                if httpx.get(self.url + "/v1/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.kill()
        pytest.fail(f"daemon did not answer in {timeout}s:\n{self.log.read_text()}")

    def client(self, token: str | None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=300)

    def term(self, timeout: float = 120) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout)
        self.proc = None
        return rc

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)
        self.proc = None


class SseReader:
    """Reads ``/v1/events/stream`` in a thread and keeps every event it got."""

    def __init__(
        self, url: str, token: str | None, last_id: int | None = None, **params: str
    ) -> None:
        self.events: list[dict[str, Any]] = []
        self.status: int | None = None
        self._stop = threading.Event()
        self._ready = threading.Event()
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        if last_id is not None:
            headers["Last-Event-ID"] = str(last_id)
        self._args = (url + "/v1/events/stream", headers, params)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._ready.wait(30)

    def _run(self) -> None:
        url, headers, params = self._args
        try:
            with httpx.stream("GET", url, headers=headers, params=params, timeout=None) as r:
                self.status = r.status_code
                self._ready.set()
                data: list[str] = []
                for line in r.iter_lines():
                    if self._stop.is_set():
                        return
                    if line.startswith("data:"):
                        data.append(line[5:].strip())
                    elif not line and data:
                        self.events.append(json.loads("\n".join(data)))
                        data = []
        except httpx.HTTPError:
            pass
        finally:
            self._ready.set()

    def wait_for(self, pred: Any, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for ev in list(self.events):
                if pred(ev):
                    return ev
            time.sleep(0.1)
        pytest.fail(f"no matching event over SSE in {timeout}s; got {self.events[-5:]}")

    def close(self) -> None:
        self._stop.set()
