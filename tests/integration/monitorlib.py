"""Drive ``vmshield monitor`` as a user would: a subprocess, 'armed' on stderr, JSON
events on stdout, SIGTERM to detach."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import pytest

from vmshield.lab.vmstest import kv

__all__ = ["MonitorRun", "kv"]


class MonitorRun:
    def __init__(self, vm: str, args: list[str], engine: str = "exit") -> None:
        self.engine = engine
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "vmshield",
                "monitor",
                vm,
                "--json",
                "--engine",
                engine,
                *args,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self.events: list[dict[str, Any]] = []
        self.stderr: list[str] = []
        self._armed = threading.Event()
        threading.Thread(target=self._read_out, daemon=True).start()
        threading.Thread(target=self._read_err, daemon=True).start()
        deadline = time.monotonic() + 90
        while not self._armed.wait(0.1):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                time.sleep(0.2)
                pytest.fail(f"monitor did not arm: {''.join(self.stderr)}")

    def _read_out(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.events.append(json.loads(line))

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line)
            if "armed" in line:
                self._armed.set()

    def wait_for(self, pred: Any, timeout: float = 20) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for ev in list(self.events):
                if pred(ev):
                    return ev
            time.sleep(0.05)
        pytest.fail(f"no matching event in {len(self.events)} events: {self.events[-5:]}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
        try:
            rc = self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGUSR1)  # the monitor prints where it hangs
            time.sleep(1)
            os.killpg(self.proc.pid, signal.SIGKILL)
            rc = self.proc.wait(10)
        time.sleep(0.1)
        return rc
