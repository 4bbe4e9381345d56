"""The gdbstub guard: frees the guest if the monitor holding QEMU's gdbstub dies.

QEMU keeps the breakpoints of a gdb client that vanished, and stops the guest at the
next hit waiting for a client that never comes. So the monitor starts this small process
(its own session, so a signal to the monitor's group does not reach it) holding a
duplicate of the gdbstub socket and the read end of a pipe. It never touches the socket
while the monitor lives: no cost per event. On a clean detach the monitor writes one
byte and the guard exits. If the pipe closes without it (the monitor was killed), the
guard interrupts the VM and sends ``D`` (``D;1`` if the stub is in multiprocess mode):
QEMU removes every breakpoint and resumes.

Run as ``python -m vmshield.hv.gdbguard SOCK_FD PIPE_FD STATE_FILE`` (stdlib only).
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import sys
import time


def _drain(s: socket.socket, seconds: float, until: bytes = b"") -> bytes:
    got = b""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        r, _, _ = select.select([s], [], [], max(0.0, end - time.monotonic()))
        if not r:
            break
        chunk = s.recv(65536)
        if not chunk:
            break
        got += chunk
        if until and until in got:
            break
    return got


def rescue(s: socket.socket) -> None:
    """Stop the VM if it runs, then detach (which also removes all breakpoints)."""
    s.setblocking(True)
    s.sendall(b"+\x03")
    got = _drain(s, 1.0, b"#")
    if got:
        s.sendall(b"+")
    # A plain D is refused (E22) by a QEMU 7.2 stub in multiprocess mode, which it keeps
    # once any earlier client asked for it: then detach the only process, D;1.
    request = b"D"
    for _ in range(4):
        s.sendall(_frame(request))
        got = _drain(s, 2.0, b"#")
        if b"OK" in got:
            s.sendall(b"+")
            return
        if b"E22" in got:
            s.sendall(b"+")
            request = b"D;1"


def _frame(payload: bytes) -> bytes:
    return b"$%b#%02x" % (payload, sum(payload) & 0xFF)


def main() -> None:
    sock_fd, pipe_fd, state = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    s = socket.socket(fileno=sock_fd)
    while True:
        try:
            data = os.read(pipe_fd, 1)
            break
        except InterruptedError:
            continue
    if data:  # clean detach by the monitor
        return
    try:
        rescue(s)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(state)


if __name__ == "__main__":
    main()
