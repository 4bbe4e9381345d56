"""A client for the QEMU guest agent protocol (qemu-guest-agent, or the lab's vmsqga).

Why: the symbol-table transfer fallback runs a script inside the guest through the
agent's ``guest-exec``. The agent is inside the guest, so its answers are hostile data:
lines are bounded, base64 is checked, and every wait has a deadline.

Protocol: JSON objects over a stream (here the Unix socket of the chardev behind the
``org.qemu.guest_agent.0`` virtio port). ``guest-sync`` with a random id flushes stale
replies of an earlier client; ``guest-exec`` starts a program and returns its pid;
``guest-exec-status`` returns ``exited``, ``exitcode`` and base64 ``out-data``.
"""

from __future__ import annotations

import base64
import binascii
import json
import secrets
import socket
import time
from pathlib import Path
from typing import Any

from vmshield.errors import HypervisorError

MAX_LINE = 64 << 20  # 16 MiB of output is 22 MiB of base64; plus slack


class GuestAgentError(HypervisorError):
    """The guest agent is missing, silent, or answered something unusable."""


class GuestAgent:
    """One connection to a guest agent socket."""

    def __init__(self, path: Path, timeout: float = 10.0) -> None:
        self.path = path
        self.timeout = timeout
        self._buf = b""
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.connect(str(path))
        except OSError as e:
            self._sock.close()
            raise GuestAgentError(f"guest agent socket {path}: {e.strerror or e}") from None

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> GuestAgent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send(self, cmd: str, args: dict[str, Any] | None = None) -> None:
        msg: dict[str, Any] = {"execute": cmd}
        if args is not None:
            msg["arguments"] = args
        self._sock.sendall(json.dumps(msg).encode() + b"\n")

    def _line(self, deadline: float) -> bytes:
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise GuestAgentError(f"guest agent {self.path}: no answer (is it running?)")
            self._sock.settimeout(min(left, 1.0))
            try:
                chunk = self._sock.recv(1 << 20)
            except TimeoutError:
                continue
            except OSError as e:
                raise GuestAgentError(f"guest agent {self.path}: {e.strerror or e}") from None
            if not chunk:
                raise GuestAgentError(f"guest agent {self.path}: connection closed")
            self._buf += chunk
            if len(self._buf) > MAX_LINE:
                raise GuestAgentError(f"guest agent {self.path}: reply longer than {MAX_LINE}")
        line, _, self._buf = self._buf.partition(b"\n")
        return line.strip(b"\xff \r\t")

    def _reply(self, deadline: float) -> Any:
        while True:
            line = self._line(deadline)
            if not line:
                continue
            try:
                msg = json.loads(line)
            except ValueError:
                raise GuestAgentError(f"guest agent {self.path}: reply is not JSON") from None
            if not isinstance(msg, dict):
                raise GuestAgentError(f"guest agent {self.path}: reply is not an object")
            if "error" in msg:
                err = msg["error"]
                desc = err.get("desc", err) if isinstance(err, dict) else err
                raise GuestAgentError(f"guest agent {self.path}: {str(desc)[:200]}")
            if "return" in msg:
                return msg["return"]

    def call(self, cmd: str, args: dict[str, Any] | None = None, timeout: float = 0) -> Any:
        self._send(cmd, args)
        return self._reply(time.monotonic() + (timeout or self.timeout))

    def sync(self) -> None:
        """Drop whatever an earlier client left unread: replies until our id comes back."""
        token = secrets.randbelow(1 << 31)
        self._send("guest-sync", {"id": token})
        deadline = time.monotonic() + self.timeout
        for _ in range(64):
            try:
                if self._reply(deadline) == token:
                    return
            except GuestAgentError as e:
                if "no answer" in str(e) or "closed" in str(e):
                    raise
        raise GuestAgentError(f"guest agent {self.path}: guest-sync never answered")

    def run(self, argv: list[str], timeout: float = 120.0) -> tuple[int, bytes]:
        """Run ``argv`` in the guest (``guest-exec`` with captured output); (status, stdout)."""
        ret = self.call("guest-exec", {"path": argv[0], "arg": argv[1:], "capture-output": True})
        pid = ret.get("pid") if isinstance(ret, dict) else None
        if not isinstance(pid, int):
            raise GuestAgentError(f"guest agent {self.path}: guest-exec gave no pid")
        deadline = time.monotonic() + timeout
        while True:
            st = self.call("guest-exec-status", {"pid": pid}, timeout=max(1.0, timeout))
            if not isinstance(st, dict):
                raise GuestAgentError(f"guest agent {self.path}: bad guest-exec-status")
            if st.get("exited"):
                break
            if time.monotonic() > deadline:
                raise GuestAgentError(f"guest agent {self.path}: {argv[0]} still runs")
            time.sleep(0.1)
        try:
            out = base64.b64decode(st.get("out-data", ""), validate=True)
        except (binascii.Error, TypeError, ValueError):
            raise GuestAgentError(f"guest agent {self.path}: out-data is not base64") from None
        code = st.get("exitcode")
        status = code if isinstance(code, int) else 128 + int(st.get("signal", 0) or 0)
        return status, out
