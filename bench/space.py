"""Security space against exit-based monitoring: guest time, side by side in one run.

One lab VM, two guest workloads, each timed by the guest itself (CLOCK_MONOTONIC):

- ``vmstest loop N``: N raw getpid() calls with a point on ``__x64_sys_getpid`` that
  reports every call: the per-event cost of each engine;
- ``vmstest mix R``: R rounds of fork+exec, ten open/read/close, two loopback connects
  and fifty getpid calls, with process.exec, file.open and net.connect monitored: the
  slowdown of a syscall-heavy workload (median of ``--repeat`` runs; the unmonitored
  runs are taken before and after each engine's, since TCG timing drifts).

Each runs with no monitoring, with the exit engine and with the security space; the
table gives guest seconds, slowdown, per-event cost, events seen and lost, and the
ratio of the exit engine's per-event cost to the security space's.
Run: ``.venv/bin/python bench/space.py [--kernel 6.1] [--calls N] [--rounds R]``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
from typing import Any

from rich.console import Console
from rich.table import Table

from vmshield.lab import vm as labvm

GETPID = ["-o", "kfunc:__x64_sys_getpid", "-f", "comm=vmstest"]
MIX = ["-o", "process.exec", "-o", "file.open", "-o", "net.connect", "-f", "comm=vmstest"]


def kv(line: str) -> dict[str, str]:
    return dict(p.split("=", 1) for p in line.split() if "=" in p)


class Monitor:
    """``vmshield monitor --json`` in the background; events collected from stdout."""

    def __init__(self, vm: str, engine: str, args: list[str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vmshield", "monitor", vm, "--json", "--engine", engine,
             *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.lines: list[str] = []
        assert self.proc.stderr is not None and self.proc.stdout is not None
        for line in self.proc.stderr:
            if "armed" in line:
                break
        else:
            raise SystemExit(f"monitor ({engine}) did not arm")
        self._t = threading.Thread(target=self.lines.extend, args=(self.proc.stdout,))
        self._t.start()

    def stop(self) -> list[dict[str, Any]]:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(120)
        self._t.join(10)
        return [json.loads(x) for x in self.lines]


def timed(vm: labvm.LabVM, cmd: str) -> tuple[int, float]:
    out = vm.run(cmd, timeout=900).output
    g = kv(out.strip().splitlines()[-1])
    return int(g["pid"]), int(g["ns"]) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--kernel", default="6.1")
    ap.add_argument("--calls", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--repeat", type=int, default=3, help="mix runs per engine (median)")
    args = ap.parse_args()
    os.environ.setdefault("VMSHIELD_RUN", tempfile.mkdtemp(prefix="vmshield-bench-"))
    name = "bench-space"
    labvm.start(name, args.kernel)
    vm = labvm.LabVM(name)
    n, r = args.calls, args.rounds
    loop_rows: list[tuple[str, float, int, int]] = []
    mix_rows: list[tuple[str, float, int]] = []
    try:
        timed(vm, "vmstest loop 1000")  # warm up: TCG translates the loops once
        timed(vm, "vmstest mix 2")
        loop_rows.append(("none", timed(vm, f"vmstest loop {n}")[1], 0, 0))
        mix = f"vmstest mix {r}"
        base_runs = [timed(vm, mix)[1] for _ in range(args.repeat)]
        for engine in ("exit", "space"):
            mon = Monitor(name, engine, GETPID)
            pid, secs = timed(vm, f"vmstest loop {n}")
            got = sum(1 for ev in mon.stop() if ev["process"] and ev["process"]["pid"] == pid)
            # vmstest calls getpid() once more itself (to print its pid): n + 1 expected.
            loop_rows.append((engine, secs, n + 1, got))
            mon = Monitor(name, engine, MIX)
            runs = [timed(vm, mix)[1] for _ in range(1 if engine == "exit" else args.repeat)]
            seen = [ev for ev in mon.stop() if ev["object"] != "space.integrity"]
            mix_rows.append((engine, statistics.median(runs), len(seen) // len(runs)))
            base_runs += [timed(vm, mix)[1] for _ in range(args.repeat)]
        mix_rows.insert(0, ("none", statistics.median(base_runs), 0))
    finally:
        labvm.stop(name)
    console = Console()
    base = loop_rows[0][1]
    per = {e: (s - base) / n * 1e6 for e, s, _, _ in loop_rows[1:]}
    t1 = Table(title=f"per event: {n} getpid() calls, every one reported ({args.kernel}, TCG)")
    for col in ("engine", "guest s", "slowdown", "per event us", "events", "lost"):
        t1.add_column(col, justify="right")
    for engine, secs, want, got in loop_rows:
        cost = f"{per[engine]:.2f}" if engine in per else "-"
        t1.add_row(engine, f"{secs:.3f}", f"{secs / base:.2f}x", cost, str(got),
                   str(want - got) if want else "-")  # fmt: skip
    console.print(t1)
    space_cost = max(per["space"], 1e-3)
    console.print(f"exit / space per-event cost: {per['exit'] / space_cost:.0f}x")
    mbase = mix_rows[0][1]
    t2 = Table(title=f"syscall-heavy mix, {r} rounds, exec+open+connect monitored")
    for col in ("engine", "guest s (median)", "slowdown", "events per run"):
        t2.add_column(col, justify="right")
    for engine, secs, events in mix_rows:
        t2.add_row(engine, f"{secs:.3f}", f"{(secs / mbase - 1) * 100:+.1f}%", str(events))
    console.print(t2)


if __name__ == "__main__":
    main()
