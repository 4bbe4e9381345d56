"""Run shell commands in a lab guest over its serial console.

The lab guest's init feeds ttyS0 to a non-interactive shell (no prompt, no echo). Each
command is sent as ``eval '<cmd>'`` followed by an ``echo`` of a marker that carries a
random nonce and the exit status, so the output's end is found without guessing, even
if the command prints something marker-like. A lab-only helper for demos and tests: the
guest tells its own truth (its ``ps``, its ``/proc/kallsyms``) through it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import secrets
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from vmshield.errors import LabError

MAX_COMMAND = 3000  # the tty's canonical line buffer is 4095 bytes
MAX_OUTPUT = 64 << 20


@dataclass(frozen=True)
class CommandResult:
    output: str
    status: int


def _quote(cmd: str) -> str:
    return "'" + cmd.replace("'", "'\\''") + "'"


class SerialConsole:
    """One exclusive session on a lab VM's serial socket (a lock file serialises users)."""

    def __init__(self, sock_path: Path, lock_path: Path) -> None:
        self.sock_path = sock_path
        self.lock_path = lock_path

    def run(self, command: str, timeout: float = 60.0) -> CommandResult:
        if len(command.encode()) > MAX_COMMAND:
            raise LabError(f"command is longer than {MAX_COMMAND} bytes")
        if "\n" in command:
            raise LabError("command must be one line")
        nonce = secrets.token_hex(8)
        # The marker's line end is part of it: the guest must have nothing left to send
        # when we hang up (QEMU 7.2's serial stalls on output written to a socket with
        # no client, until the next client comes).
        marker = re.compile(rb"@@VMS:" + nonce.encode() + rb":(\d+)@@\r?\n")
        start = re.compile(rb"@@VMS:" + nonce.encode() + rb":start@@\r?\n")
        # The start marker fences off stale output of an earlier, abandoned command.
        line = (
            f'echo "@@VMS:{nonce}:start@@"; (eval {_quote(command)}) </dev/null 2>&1; '
            f'echo "@@VMS:{nonce}:$?@@"\n'
        )
        deadline = time.monotonic() + timeout
        # The lock file lives in the private run folder; never follow a symlink there.
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        with os.fdopen(os.open(self.lock_path, flags, 0o600), "a+") as lock:
            self._lock(lock, deadline)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.settimeout(max(0.1, deadline - time.monotonic()))
                s.connect(str(self.sock_path))
                s.sendall(line.encode())
                buf = bytearray()
                while True:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise LabError(f"guest command timed out after {timeout:.0f} s: {command}")
                    # Nudge: under TCG the guest's 8250 driver can stop transmitting until
                    # it takes a receive interrupt; an empty line is a no-op for the
                    # guest's shell and restarts it.
                    s.settimeout(min(left, 0.05))
                    try:
                        chunk = s.recv(1 << 16)
                    except TimeoutError:
                        # Never block on a nudge: while the VM is stopped (a pause, a
                        # dump) QEMU reads nothing from the socket and its buffer fills.
                        with contextlib.suppress(BlockingIOError, InterruptedError):
                            s.send(b"\n", socket.MSG_DONTWAIT)
                        continue
                    if not chunk:
                        raise LabError("serial console closed (did the VM stop?)")
                    buf += chunk
                    if len(buf) > MAX_OUTPUT:
                        raise LabError(f"guest command printed more than {MAX_OUTPUT} bytes")
                    m = marker.search(buf, max(0, len(buf) - len(chunk) - 64))
                    if m:
                        st = start.search(buf)
                        begin = st.end() if st else 0
                        out = bytes(buf[begin : m.start()]).replace(b"\r\n", b"\n")
                        return CommandResult(out.decode(errors="replace"), int(m[1]))
            except OSError as e:
                raise LabError(f"serial console {self.sock_path}: {e}") from e
            finally:
                s.close()

    @staticmethod
    def _lock(f: object, deadline: float) -> None:
        fd = f.fileno()  # type: ignore[attr-defined]
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise LabError("serial console is busy (another vmshield vm run?)") from None
                time.sleep(0.05)
