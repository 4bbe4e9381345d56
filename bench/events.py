"""Exit-based engine cost: a syscall-heavy guest workload, side by side in one run.

Three runs of ``vmstest loop N`` (N raw getpid() calls, timed by the guest itself):
no monitoring; a monitoring point on ``__x64_sys_getpid`` whose filter never matches;
the same point matching every call (one event per call). Prints the guest time of each,
the per-event cost and events per second, and checks that no event was lost.
Run: ``.venv/bin/python bench/events.py [--kernel 6.1] [--calls N]``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
from typing import Any

from rich.console import Console
from rich.table import Table

from vmshield.lab import vm as labvm

POINT = "kfunc:__x64_sys_getpid"


def kv(line: str) -> dict[str, str]:
    return dict(p.split("=", 1) for p in line.split() if "=" in p)


class Monitor:
    """``vmshield monitor --json`` in the background; events counted from stdout."""

    def __init__(self, vm: str, args: list[str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vmshield", "monitor", vm, "--json", "--engine", "exit", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.lines: list[str] = []
        assert self.proc.stderr is not None and self.proc.stdout is not None
        for line in self.proc.stderr:
            if "armed" in line:
                break
        else:
            raise SystemExit("monitor did not arm")
        self._t = threading.Thread(target=self.lines.extend, args=(self.proc.stdout,))
        self._t.start()
        self.summary = ""

    def stop(self) -> list[dict[str, Any]]:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)
        self._t.join(10)
        assert self.proc.stderr is not None
        self.summary = " ".join(self.proc.stderr.read().split())
        return [json.loads(x) for x in self.lines]

    def round_trips(self) -> str:
        m = re.search(r"([0-9.]+) gdbstub round trips per hit", self.summary)
        return m[1] if m else "?"


def guest_loop(vm: labvm.LabVM, n: int) -> tuple[int, float]:
    out = vm.run(f"vmstest loop {n}", timeout=600).output
    g = kv(out.strip().splitlines()[-1])
    return int(g["pid"]), int(g["ns"]) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--kernel", default="6.1")
    ap.add_argument("--calls", type=int, default=3000)
    args = ap.parse_args()
    os.environ.setdefault("VMSHIELD_RUN", tempfile.mkdtemp(prefix="vmshield-bench-"))
    name = "bench-events"
    labvm.start(name, args.kernel)
    vm = labvm.LabVM(name)
    n = args.calls
    rows = []
    try:
        guest_loop(vm, 1000)  # warm up: TCG translates the loop once
        _, base = guest_loop(vm, n)
        rows.append(("no monitoring", base, 0, 0, "-"))
        mon = Monitor(name, ["-o", POINT, "-f", "comm=no-such-comm"])
        _, miss = guest_loop(vm, n)
        mon.stop()
        rows.append(("point, filter never matches", miss, 0, 0, mon.round_trips()))
        mon = Monitor(name, ["-o", POINT, "-f", "comm=vmstest"])
        pid, hit = guest_loop(vm, n)
        events = mon.stop()
        got = sum(1 for e in events if e["process"]["pid"] == pid)
        # vmstest calls getpid() once more itself (to print its pid): n + 1 expected.
        rows.append(("point hit on every call", hit, n + 1, got, mon.round_trips()))
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
