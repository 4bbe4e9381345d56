"""The lab guest's test program ``vmstest``, seen from the host.

Every run prints one line of ``key=value`` pairs (its pid, the result, the guest time it
measured with CLOCK_MONOTONIC): the guest's own truth that tests and benchmarks hold
vmshield's events against.
"""

from __future__ import annotations

from vmshield.lab.vm import LabVM


def kv(line: str) -> dict[str, str]:
    """The ``key=value`` pairs of a vmstest output line."""
    return dict(p.split("=", 1) for p in line.split() if "=" in p)


def timed(vm: LabVM, cmd: str, timeout: float = 900) -> tuple[int, float]:
    """Run a timing command of vmstest (``loop N``, ``mix R``): its pid and the seconds
    it measured itself (host-side overhead of the serial console excluded)."""
    out = vm.run(cmd, timeout=timeout).output
    g = kv(out.strip().splitlines()[-1])
    return int(g["pid"]), int(g["ns"]) / 1e9
