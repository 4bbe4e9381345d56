"""Security space against exit-based monitoring: guest time, side by side in one run.

One lab VM, two guest workloads, each timed by the guest itself (CLOCK_MONOTONIC):

- ``vmstest loop N``: N raw getpid() calls with a point on ``__x64_sys_getpid`` that
  reports every call: the per-event cost of each engine;
- ``vmstest mix R``: R rounds of fork+exec, ten open/read/close, two loopback connects
  and fifty getpid calls, with process.exec, file.open and net.connect monitored: the
  slowdown of a syscall-heavy workload.

Each engine's runs are compared with unmonitored runs of the same size taken right
before and right after them (TCG timing drifts over minutes); figures are medians of
``--repeat`` runs (the exit engine runs once: it is thousands of times slower, and its
mix gets fewer rounds). Printed: per-event cost, slowdown, events seen and lost, the ratio of
the exit engine's per-event cost to the security space's.
Run: ``.venv/bin/python bench/space.py [--kernel 6.1] [--calls N] [--rounds R]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

from rich.console import Console
from rich.table import Table

from vmshield import Event, IsolationRequest, Monitor, open_vm
from vmshield.guest.vm import VM
from vmshield.lab import vm as labvm
from vmshield.lab.vmstest import timed

GETPID = ["kfunc:__x64_sys_getpid"]
MIX = ["process.exec", "file.open", "net.connect"]


def watch(vm: VM, engine: str, objects: list[str]) -> tuple[Monitor, list[Event]]:
    """``objects`` armed (filtered to vmstest) on ``engine``, events collected here."""
    events: list[Event] = []
    reqs = [IsolationRequest(vm=vm.name, object=o, filters={"comm": "vmstest"}) for o in objects]
    mon = Monitor(vm, reqs, engine=engine)
    mon.subscribe(events.append)
    mon.start()
    return mon, events


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--kernel", default="6.1")
    ap.add_argument("--calls", type=int, default=3000, help="getpid calls (within one ring)")
    ap.add_argument("--rounds", type=int, default=150, help="mix rounds (space)")
    ap.add_argument("--exit-rounds", type=int, default=10, help="mix rounds (exit)")
    ap.add_argument("--repeat", type=int, default=5, help="runs per measurement (median)")
    args = ap.parse_args()
    os.environ.setdefault("VMSHIELD_RUN", tempfile.mkdtemp(prefix="vmshield-bench-"))
    name = "bench-space"
    labvm.start(name, args.kernel)
    lab = labvm.LabVM(name)
    n = args.calls
    rounds = {"space": args.rounds, "exit": args.exit_rounds}

    def median_of(cmd: str, times: int) -> float:
        return statistics.median(timed(lab, cmd)[1] for _ in range(times))

    # Each engine is compared with unmonitored runs of the same size taken right before
    # and right after it (TCG timing drifts over minutes).
    loop: dict[str, tuple[float, float, int, int]] = {}  # engine -> (base s, s, want, got)
    mix: dict[str, tuple[float, float, int]] = {}  # engine -> (base s, s, events per round)
    try:
        vm = open_vm(name)
        timed(lab, "vmstest loop 1000")  # warm up: TCG translates the loops once
        timed(lab, "vmstest mix 2")
        for engine in ("exit", "space"):
            times = 1 if engine == "exit" else args.repeat
            cmd = f"vmstest loop {n}"
            before = [timed(lab, cmd)[1] for _ in range(args.repeat)]
            mon, events = watch(vm, engine, GETPID)
            runs = []
            for _ in range(times):
                runs.append(timed(lab, cmd))
                time.sleep(1.0)  # one burst fills most of a ring: let the host drain it
            mon.stop()
            pids = {pid for pid, _ in runs}
            got = sum(1 for ev in events if ev.process and ev.process.pid in pids)
            # vmstest calls getpid() once more itself (to print its pid): n + 1 per run.
            after = [timed(lab, cmd)[1] for _ in range(args.repeat)]
            base = statistics.median(before + after)
            loop[engine] = (base, statistics.median(s for _, s in runs), (n + 1) * times, got)
            r = rounds[engine]
            cmd = f"vmstest mix {r}"
            before = [timed(lab, cmd)[1] for _ in range(args.repeat)]
            mon, events = watch(vm, engine, MIX)
            secs = median_of(cmd, times)
            mon.stop()
            seen = [ev for ev in events if ev.object != "space.integrity"]
            after = [timed(lab, cmd)[1] for _ in range(args.repeat)]
            mix[engine] = (statistics.median(before + after), secs, len(seen) // times // r)
        vm.close()
    finally:
        labvm.stop(name)
    console = Console()
    t1 = Table(title=f"per event: {n} getpid() calls, every one reported ({args.kernel}, TCG)")
    for col in ("engine", "unmonitored s", "monitored s", "slowdown", "us per event",
                "events", "lost"):  # fmt: skip
        t1.add_column(col, justify="right")
    per = {}
    for engine, (base, secs, want, got) in loop.items():
        per[engine] = (secs - base) / n * 1e6
        t1.add_row(engine, f"{base:.4f}", f"{secs:.4f}", f"{secs / base:.2f}x",
                   f"{per[engine]:.2f}", str(got), str(want - got))  # fmt: skip
    console.print(t1)
    console.print(f"exit / space per-event cost: {per['exit'] / max(per['space'], 1e-3):.0f}x")
    t2 = Table(title="syscall-heavy mix (per round: fork+exec, 10 open/read/close, 2 connects, "
                     "50 getpid), exec+open+connect monitored")  # fmt: skip
    for col in ("engine", "rounds", "unmonitored s", "monitored s", "slowdown",
                "events per round"):  # fmt: skip
        t2.add_column(col, justify="right")
    for engine, (base, secs, per_round) in mix.items():
        t2.add_row(engine, str(rounds[engine]), f"{base:.3f}", f"{secs:.3f}",
                   f"{(secs / base - 1) * 100:+.1f}%", str(per_round))  # fmt: skip
    console.print(t2)


if __name__ == "__main__":
    main()
