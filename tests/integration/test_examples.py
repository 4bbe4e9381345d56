"""The scripts in examples/ run as a user would run them, against a real lab VM, so
that the documentation they are never rots."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from vmshield.paths import project_root

from .conftest import Lab, boot
from .monitorlib import kv

EXAMPLES = project_root() / "examples"


@pytest.fixture(scope="module")
def lab61() -> Iterator[Lab]:
    yield from boot("6.1", "examples-6.1")


def _start(script: str, *args: str, ready: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, str(EXAMPLES / script), *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    assert proc.stdout is not None
    deadline = time.monotonic() + 120
    for line in proc.stdout:
        if ready in line:
            return proc
        if time.monotonic() > deadline:
            break
    proc.kill()
    pytest.fail(f"{script} did not get ready: {proc.stderr.read() if proc.stderr else ''}")


def _finish(proc: subprocess.Popen[str]) -> str:
    out, errs = proc.communicate(timeout=120)
    assert proc.returncode == 0, errs
    return out


def test_list_processes(lab61: Lab) -> None:
    res = subprocess.run(
        [sys.executable, str(EXAMPLES / "list_processes.py"), lab61.name],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    assert lab61.sh("uname -r").strip() in res.stdout
    rows = [line.split() for line in res.stdout.splitlines()[1:]]
    assert rows[0][:2] == ["1", "0"]  # pid 1, parent 0


def test_watch_exec_open(lab61: Lab) -> None:
    proc = _start("watch_exec_open.py", lab61.name, "10", ready="watching with")
    lab61.sh("vmstest open /etc/passwd")
    out = _finish(proc)
    assert any(
        line.startswith("process.exec") and "/bin/vmstest" in line for line in out.splitlines()
    )
    assert any(line.startswith("file.open") and "/etc/passwd" in line for line in out.splitlines())
    assert "events on the space engine" in out


def test_deny_connects(lab61: Lab) -> None:
    proc = _start("deny_connects.py", lab61.name, "7777", "8", ready="denying connects")
    g = kv(lab61.sh("vmstest connect 7777"))
    other = kv(lab61.sh("vmstest connect 7778"))
    out = _finish(proc)
    assert g["errno"] == "1"  # EPERM
    assert other["errno"] != "1"  # another port is not denied (refused: nobody listens)
    assert "denied connect(s) from vmstest" in out and "total: 1" in out
