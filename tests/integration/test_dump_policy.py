"""The dump action's limits: at most one dump per interval for each request, refused
with a clear event (never silently) when the directory lacks room, and a bad
``--dump-dir`` refused before anything is armed. One kernel suffices: the policy is
host-side and the same for both engines."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import Lab, boot
from .monitorlib import MonitorRun

VMSHIELD = [sys.executable, "-m", "vmshield"]


@pytest.fixture(scope="module")
def lab61() -> Iterator[Lab]:
    yield from boot("6.1", "dumppol-6.1")


def _armed_nothing(lab: Lab) -> None:
    """Nothing armed: the guest's open runs at full speed with no breakpoint."""
    assert "errno=0" in lab.sh("vmstest open /etc/shadow")


def test_second_dump_within_interval_is_refused_in_the_event(lab61: Lab, tmp_path: Path) -> None:
    mon = MonitorRun(
        lab61.name,
        ["-o", "file.open", "-f", "path=/etc/shadow", "--action", "dump",
         "--dump-dir", str(tmp_path), "--dump-interval", "600"],
    )  # fmt: skip
    try:
        lab61.sh("vmstest open /etc/shadow")
        lab61.sh("vmstest open /etc/shadow")
        mon.wait_for(lambda e: sum(x["object"] == "file.open" for x in mon.events) >= 2, 60)
    finally:
        assert mon.stop() == 0, "".join(mon.stderr)
    first, second = [e for e in mon.events if e["object"] == "file.open"][:2]
    assert first["action"] == "dump" and Path(first["detail"]["dump"]).is_file()
    assert second["action"] == "log"
    assert "at most one dump per 600 s" in second["detail"]["refused"]
    assert len(list(tmp_path.glob("*.elf"))) == 1


def _monitor_rc(lab: Lab, *args: str) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(
        [*VMSHIELD, "monitor", lab.name, "-o", "file.open", "--action", "dump",
         "--duration", "1", *args],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    res.stderr = " ".join(res.stderr.split())  # the console may wrap a long line
    return res


def test_bad_dump_dir_is_refused_before_arming(lab61: Lab, tmp_path: Path) -> None:
    res = _monitor_rc(lab61, "--dump-dir", str(tmp_path / "missing"))
    assert res.returncode == 2, res.stderr
    assert "not a directory" in res.stderr and "Traceback" not in res.stderr
    assert "armed" not in res.stderr
    _armed_nothing(lab61)


def test_dump_dir_without_room_is_refused(lab61: Lab, tmp_path: Path) -> None:
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)], check=True)
    try:
        res = _monitor_rc(lab61, "--dump-dir", str(small))
        assert res.returncode == 2, res.stderr
        assert "MiB free, a dump of this VM needs about 528 MiB" in res.stderr
        assert "armed" not in res.stderr
    finally:
        subprocess.run(["umount", str(small)], check=True)
    _armed_nothing(lab61)
