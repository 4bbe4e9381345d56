"""Actions recover: after pause and resume the monitor goes on as before, and detach
never leaves a guest stopped or wedged, whatever state the session was in.

Both engines, every lab kernel. The guest tells its own truth: the serial shell answers,
the program's open succeeds after resume, QMP says whether the VM runs.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from typing import Any

import pytest

from vmshield.hv.target import Target

from .conftest import Lab
from .monitorlib import MonitorRun, kv

VMSHIELD = [sys.executable, "-m", "vmshield"]


def _status(lab: Lab) -> str:
    with Target(lab.name) as t:
        return t.qmp.status()


def _wait_status(lab: Lab, want: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while (got := _status(lab)) != want:
        if time.monotonic() > deadline:
            pytest.fail(f"VM is {got!r}, expected {want!r}")
        time.sleep(0.1)


def _open_in_background(lab: Lab, out: dict[str, str]) -> threading.Thread:
    worker = threading.Thread(
        target=lambda: out.update(out=lab.sh("vmstest open /etc/shadow", timeout=120))
    )
    worker.start()
    return worker


def _resume(lab: Lab) -> None:
    subprocess.run([*VMSHIELD, "resume", lab.name], check=True, capture_output=True)


@pytest.mark.parametrize("engine", ["exit", "space"])
def test_pause_resume_then_next_event(lab: Lab, engine: str) -> None:
    """Two pauses in a row: the second hit after a resume is paused and reported too,
    and the guest answers between and after them."""
    mon = MonitorRun(
        lab.name, ["-o", "file.open", "-f", "path=/etc/shadow", "--action", "pause"], engine
    )
    try:
        for round_ in (1, 2):
            result: dict[str, str] = {}
            worker = _open_in_background(lab, result)
            try:
                mon.wait_for(
                    lambda e, n=round_: (
                        e["object"] == "file.open"
                        and sum(x["object"] == "file.open" for x in mon.events) >= n
                    ),
                    timeout=60,
                )
                assert sum(e["action"] == "pause" for e in mon.events) == round_
                assert _status(lab) != "running"
                _resume(lab)
                worker.join(60)
                assert not worker.is_alive()
                assert kv(result["out"])["errno"] == "0"
            finally:
                if worker.is_alive():
                    _resume(lab)
                    worker.join(30)
            assert lab.sh("echo alive").strip() == "alive"
    finally:
        assert mon.stop() == 0, "".join(mon.stderr)
    assert _status(lab) == "running"
    assert lab.sh("echo alive").strip() == "alive"


@pytest.mark.parametrize("engine", ["exit", "space"])
def test_detach_while_paused_keeps_the_pause_and_leaves_nothing(lab: Lab, engine: str) -> None:
    """The monitor ends while its pause is in force: the VM stays paused for the
    operator, nothing of vmshield remains, and resume lets the guest go on."""
    mon = MonitorRun(
        lab.name, ["-o", "file.open", "-f", "path=/etc/shadow", "--action", "pause"], engine
    )
    result: dict[str, str] = {}
    worker = _open_in_background(lab, result)
    try:
        mon.wait_for(lambda e: e["object"] == "file.open", timeout=60)
    finally:
        rc = mon.stop()
    try:
        assert rc == 0, "".join(mon.stderr)
        assert _status(lab) == "paused"
        with Target(lab.name) as t:
            assert not t.gdb_path().with_suffix(".armed.json").exists()
            assert not t.gdb_path().with_suffix(".space.json").exists()
    finally:
        _resume(lab)
        worker.join(60)
    assert kv(result["out"])["errno"] == "0"
    # No breakpoint and no patched site left: the same open runs freely.
    assert kv(lab.sh("vmstest open /etc/shadow"))["errno"] == "0"
    assert _status(lab) == "running"


def _gdb_frame(payload: bytes) -> bytes:
    return b"$%b#%02x" % (payload, sum(payload) & 0xFF)


def _raw_gdb(path: str, payloads: list[bytes]) -> list[bytes]:
    """A minimal gdb client, as another debugger would be (acks kept)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(path)
    replies: list[bytes] = []
    buf = b""
    try:
        for p in payloads:
            s.sendall(_gdb_frame(p))
            while True:
                while b"#" not in buf[buf.find(b"$") :] or len(buf) < buf.rfind(b"#") + 3:
                    buf += s.recv(4096)
                start = buf.index(b"$")
                end = buf.index(b"#", start)
                body, buf = buf[start + 1 : end], buf[end + 3 :]
                s.sendall(b"+")
                if body.startswith((b"T", b"S")) and not p.startswith(b"?"):
                    continue  # the stop reply of our connect
                replies.append(body)
                break
    finally:
        s.close()
    return replies


def test_detach_after_a_multiprocess_gdb_client(lab: Lab) -> None:
    """QEMU 7.2 keeps multiprocess mode once any gdb client asked for it; then a plain
    ``D`` is refused and the VM stayed paused after vmshield 'detached'."""
    with Target(lab.name) as t:
        gdb = str(t.gdb_path())
    replies = _raw_gdb(gdb, [b"qSupported:multiprocess+", b"D;1"])
    assert b"multiprocess+" in replies[0] and replies[1] == b"OK", replies
    _wait_status(lab, "running")
    mon = MonitorRun(lab.name, ["-o", "file.open", "-f", "path=/etc/shadow"], "exit")
    try:
        lab.sh("vmstest open /etc/shadow")
        ev: dict[str, Any] = mon.wait_for(lambda e: e["object"] == "file.open")
        assert ev["process"]["comm"] == "vmstest"
    finally:
        assert mon.stop() == 0, "".join(mon.stderr)
    _wait_status(lab, "running")
    assert lab.sh("echo alive").strip() == "alive"
    # And by hand: `vmshield detach` on the same stub leaves the VM running.
    subprocess.run([*VMSHIELD, "detach", lab.name], check=True, capture_output=True)
    _wait_status(lab, "running")
    assert lab.sh("echo alive").strip() == "alive"
