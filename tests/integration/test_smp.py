"""Two vCPUs: each event names the task that really did it, whichever CPU it ran on
(exit engine: the vCPU that stopped; security space: the per-CPU ring it landed in)."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest

from .conftest import Lab, boot
from .monitorlib import MonitorRun


@pytest.fixture(scope="module")
def smp_lab() -> Iterator[Lab]:
    yield from boot("6.12", "smp-6.12", cpus=2)


@pytest.mark.parametrize("engine", ["exit", "space"])
def test_events_from_both_vcpus(smp_lab: Lab, engine: str) -> None:
    lab = smp_lab
    mon = MonitorRun(lab.name, ["-o", "file.open,path=/etc/passwd", "-o", "net.connect"], engine)
    try:
        out = lab.sh(
            "for i in 1 2 3 4 5 6; do vmstest open /etc/passwd & vmstest connect 6000 & done; wait"
        )
        guest = sorted(int(p) for p in re.findall(r"\bpid=(\d+)", out))
        assert len(guest) == 12
        for pid in guest:
            mon.wait_for(lambda e, pid=pid: e["process"]["pid"] == pid)
    finally:
        assert mon.stop() == 0, "".join(mon.stderr)
    assert sorted(e["process"]["pid"] for e in mon.events) == guest
    assert {e["point"]["cpu"] for e in mon.events} <= {0, 1}
