"""Exit-based engine cost: a syscall-heavy guest workload, side by side in one run.

Three runs of ``vmstest loop N`` (N raw getpid() calls, timed by the guest itself):
no monitoring; a monitoring point on ``__x64_sys_getpid`` whose filter never matches;
the same point matching every call (one event per call). Prints the guest time of each,
the per-event cost and events per second, and checks that no event was lost.
Run: ``.venv/bin/python bench/events.py [--kernel 6.1] [--calls N]``.
"""

from __future__ import annotations

import argparse
import os
import tempfile

from rich.console import Console
from rich.table import Table

from vmshield import EngineKind, Event, IsolationRequest, Monitor, open_vm
from vmshield.guest.vm import VM
from vmshield.lab import vm as labvm
from vmshield.lab.vmstest import timed

POINT = "kfunc:__x64_sys_getpid"


def watch(vm: VM, flt: dict[str, str]) -> tuple[Monitor, list[Event]]:
    """The exit engine armed on the point, its events collected in this process."""
    events: list[Event] = []
    req = IsolationRequest(vm=vm.name, object=POINT, filters=flt)
    mon = Monitor(vm, [req], engine=EngineKind.EXIT)
    mon.subscribe(events.append)
    mon.start()
    return mon, events


def rt_per_hit(mon: Monitor) -> str:
    return f"{mon.summary().round_trips_per_hit:.1f}"


def loop(lab: labvm.LabVM, n: int) -> tuple[int, float]:
    return timed(lab, f"vmstest loop {n}", timeout=600)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--kernel", default="6.1")
    ap.add_argument("--calls", type=int, default=3000)
    args = ap.parse_args()
    os.environ.setdefault("VMSHIELD_RUN", tempfile.mkdtemp(prefix="vmshield-bench-"))
    name = "bench-events"
    labvm.start(name, args.kernel)
    lab = labvm.LabVM(name)
    n = args.calls
    rows = []
    try:
        with open_vm(name) as vm:
            loop(lab, 1000)  # warm up: TCG translates the loop once
            _, base = loop(lab, n)
            rows.append(("no monitoring", base, 0, 0, "-"))
            mon, _ = watch(vm, {"comm": "no-such-comm"})
            _, miss = loop(lab, n)
            mon.stop()
            rows.append(("point, filter never matches", miss, 0, 0, rt_per_hit(mon)))
            mon, events = watch(vm, {"comm": "vmstest"})
            pid, hit = loop(lab, n)
            mon.stop()
            got = sum(1 for e in events if e.process and e.process.pid == pid)
            # vmstest calls getpid() once more itself (to print its pid): n + 1 expected.
            rows.append(("point hit on every call", hit, n + 1, got, rt_per_hit(mon)))
    finally:
        labvm.stop(name)
    table = Table(title=f"exit engine, {n} getpid() calls in the guest ({args.kernel}, TCG)")
    cols = ("run", "guest s", "slowdown", "per call us", "events", "lost", "events/s", "RT/hit")
    for col in cols:
        table.add_column(col, justify="right")
    for label, secs, want, got, rt in rows:
        per = (secs - base) / n * 1e6
        per_s = f"{per:.0f}" if secs > base else "-"
        rate = f"{got / secs:.0f}" if got else "-"
        table.add_row(
            label, f"{secs:.3f}", f"{secs / base:.1f}x", per_s, str(got), str(want - got), rate,
            rt,
        )  # fmt: skip
    Console().print(table)


if __name__ == "__main__":
    main()
