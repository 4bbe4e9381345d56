"""Event throughput of the security space (issue 12), side by side in one run.

Three measurements:

1. **Bursts on a VM.** One lab VM (``--kernel``, 512 MiB, 1 vCPU); ``vmstest loop N``
   (N raw ``getpid()`` calls, timed by the guest itself) run ``--bursts`` times back to
   back, first unmonitored, then with ``kfunc:__x64_sys_getpid`` filtered
   ``comm=vmstest`` on the security space (events taken as JSON lines, as
   ``vmshield monitor --json`` takes them), then with the guest kernel's own kprobe
   event tracing as the peer (tracefs ``kprobe_events``
   ``p:vmsgetpid __x64_sys_getpid comm=$comm``, filtered to vmstest, enabled through the
   lab serial shell, counted from the trace buffer). Per run: events delivered, dropped,
   host CPU per event (the whole bench process's CPU time over the bursts, serial
   console included, divided by the events), guest time and guest cost per event.
2. **Host drain rate without a VM.** Rings filled with the real layout by the Python
   model of the agent (:class:`vmshield.space.rings.AgentModel`) with kfunc records of
   the same shape (8 MiB: 65,536 records), drained and decoded to JSON lines, and to
   ``vmshield.Event`` objects, on one core (process CPU time, best of 5: the machine is
   shared, and the best run is the one least disturbed).

Run: ``.venv/bin/python bench/throughput.py [--kernel 6.1] [--calls 30000] [--bursts 5]``
(``--no-vm``: only the drain rate).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import tempfile
import time
from types import SimpleNamespace
from typing import Any

from rich.console import Console
from rich.table import Table

from vmshield import Event, IsolationRequest, Monitor, open_vm
from vmshield.lab import vm as labvm
from vmshield.lab.vmstest import timed
from vmshield.monitor.space_engine import SpaceStats
from vmshield.monitor.space_events import RecordDecoder, SiteDecoder, SiteRequest
from vmshield.objects.catalog import plan_for
from vmshield.space import layout as L
from vmshield.space.rings import AgentModel, RingReader

TRACE = "/sys/kernel/tracing"


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


# -- 2. the drain rate on recorded rings -------------------------------------------------


def recorded_ring(size: int = 8 << 20, distinct: bool = False) -> tuple[bytearray, int]:
    """A ring filled the way the agent fills it on ``vmstest loop``: kfunc records (six
    argument registers, no items), one task, 1 us apart; the registers are the same in
    every record (a syscall's pt_regs pointer), or with ``distinct`` all different (the
    decoder's cache of their text never hits)."""
    buf = bytearray(L.ring_bytes(size))
    agent = AgentModel(buf, size)
    n = 0
    while True:
        rec = L.Record()
        rec.pid = rec.tgid = 1234
        rec.ppid, rec.comm, rec.task = 1, b"vmstest", 0xFFFF888003A1C000
        rec.ns, rec.matched = 10**9 + n * 1000, 1
        regs = (
            (0xFFFFC90000123F58, 39, n, n * 8, 0, 0)
            if distinct
            else (0xFFFFC90000123F58, 39, 0, 0, 0, 0)
        )
        if not agent.hit(rec, regs, max_size=L.RECORD_HEADER + 48):
            break
        n += 1
    agent.set("hits", n)  # the one that found the ring full is not part of the recording
    agent.set("drops", 0)
    return buf, n


def drain_rate(objects: bool, distinct: bool, repeat: int = 5) -> tuple[int, float, int]:
    """(records, best events/s of process CPU time, bytes per record) for one full
    8 MiB ring decoded to JSON lines (``objects``: to Event objects too)."""
    buf, n = recorded_ring(distinct=distinct)
    size = 8 << 20

    def read(va: int, k: int) -> bytes:
        return bytes(buf[va : va + k])

    req = IsolationRequest(vm="bench", object="kfunc:__x64_sys_getpid",
                           filters={"comm": "vmstest"})  # fmt: skip
    rr: Any = SimpleNamespace(
        request=req, point=SimpleNamespace(symbol="__x64_sys_getpid", address=0xFFFFFFFF810C6F20)
    )
    no_kernel: Any = None  # a kfunc: plan reads no struct offsets
    plan = plan_for("kfunc:__x64_sys_getpid", no_kernel)
    best = 0.0
    for _ in range(repeat):
        site = SiteDecoder(0, plan, [SiteRequest(0, rr, 0, True, "log")], True)
        dec = RecordDecoder("bench", {0: site}, lambda ns: 1.7e9 + ns / 1e9, SpaceStats(),
                            lambda s, r: None)  # fmt: skip
        lines: list[str] = []
        events: list[Event] = []
        reader = RingReader(read, lambda va, d: None, lambda va: va, 0, len(buf), 1, size)
        t0 = time.process_time()
        dec.decode(list(reader.drain()), lines.append, events.append if objects else None)
        dt = time.process_time() - t0
        assert len(lines) == n and not reader.take_findings()
        best = max(best, n / dt)
    return n, best, (size // n) & ~7


# -- 1. bursts on a VM --------------------------------------------------------------------


def bursts(lab: labvm.LabVM, n: int, count: int) -> list[tuple[int, float]]:
    return [timed(lab, f"vmstest loop {n}") for _ in range(count)]


def space_run(vm: Any, lab: labvm.LabVM, n: int, count: int) -> dict[str, Any]:
    req = IsolationRequest(vm=vm.name, object="kfunc:__x64_sys_getpid",
                           filters={"comm": "vmstest"})  # fmt: skip
    per_pid: dict[int, int] = {}

    def line(text: str) -> None:
        # Counting by pid without parsing the JSON: '"process":{"pid":1234,'.
        at = text.find('"process":{"pid":')
        if at >= 0:
            pid = int(text[at + 17 : text.index(",", at + 17)])
            per_pid[pid] = per_pid.get(pid, 0) + 1

    mon = Monitor(vm, [req], engine="space")
    mon.subscribe_json(line)
    mon.start()
    try:
        c0 = cpu_seconds()
        runs = bursts(lab, n, count)
        time.sleep(1.0)  # the last drain
        c1 = cpu_seconds()
    finally:
        mon.stop()
    s = mon.summary()
    got = sum(per_pid.get(pid, 0) for pid, _ in runs)
    return {"runs": runs, "got": got, "dropped": s.drops, "cpu": c1 - c0,
            "ring": getattr(getattr(mon.engine, "space", None), "region", None)}  # fmt: skip


def kprobe_run(lab: labvm.LabVM, n: int, count: int) -> dict[str, Any]:
    """The guest kernel's own kprobe event on the same function, comm fetched."""
    setup = (
        f"mountpoint -q {TRACE} || mount -t tracefs nodev {TRACE}; "
        f"echo 0 > {TRACE}/tracing_on; echo > {TRACE}/trace; "
        f"echo 65536 > {TRACE}/buffer_size_kb; "
        f"echo 'p:vmsgetpid __x64_sys_getpid comm=$comm' > {TRACE}/kprobe_events; "
        f"echo 'comm == \"vmstest\"' > {TRACE}/events/kprobes/vmsgetpid/filter; "
        f"echo 1 > {TRACE}/events/kprobes/vmsgetpid/enable; echo 1 > {TRACE}/tracing_on"
    )
    lab.run(setup, timeout=60)
    try:
        runs = bursts(lab, n, count)
        lab.run(f"echo 0 > {TRACE}/tracing_on", timeout=60)
        got = int(lab.run(f"grep -c vmsgetpid: {TRACE}/trace", timeout=300).output.split()[-1])
        out = lab.run(f"cat {TRACE}/per_cpu/cpu0/stats", timeout=60).output
        stats = {k.strip(): v.strip() for k, _, v in (x.partition(":") for x in out.splitlines())}
        lost = sum(int(stats.get(k, "0") or 0) for k in ("overrun", "dropped events"))
    finally:
        lab.run(
            f"echo 0 > {TRACE}/events/kprobes/vmsgetpid/enable; "
            f"echo '-:vmsgetpid' >> {TRACE}/kprobe_events; echo > {TRACE}/trace; "
            f"echo 1408 > {TRACE}/buffer_size_kb",
            timeout=60,
        )
    return {"runs": runs, "got": got, "dropped": lost, "cpu": 0.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--kernel", default="6.1")
    ap.add_argument("--calls", type=int, default=30000)
    ap.add_argument("--bursts", type=int, default=5)
    ap.add_argument("--no-vm", action="store_true", help="only the drain rate")
    args = ap.parse_args()
    console = Console(width=150)
    load = os.getloadavg()[0]
    t2 = Table(title=f"host drain rate on recorded rings, no VM (one core, process CPU "
                     f"time, best of 5; load average {load:.1f} on "
                     f"{os.cpu_count()} cores)")  # fmt: skip
    for col in ("decoded to", "records (one 8 MiB ring)", "bytes per record", "events/s"):
        t2.add_column(col, justify="right")
    for objects, distinct in ((False, False), (False, True), (True, False)):
        n, rate, per = drain_rate(objects, distinct)
        what = "JSON lines + vmshield.Event objects" if objects else "JSON lines"
        what += ", registers differ in every record" if distinct else ""
        t2.add_row(what, f"{n:,}", str(per), f"{rate:,.0f}")
    if args.no_vm:
        console.print(t2)
        return
    os.environ.setdefault("VMSHIELD_RUN", tempfile.mkdtemp(prefix="vmshield-bench-"))
    name = "t-throughput"
    labvm.start(name, args.kernel, memory=512, cpus=1)
    lab = labvm.LabVM(name)
    n, count = args.calls, args.bursts
    rows: dict[str, dict[str, Any]] = {}
    try:
        with open_vm(name) as vm:
            timed(lab, "vmstest loop 1000")  # warm up: TCG translates the loop once
            base_before = bursts(lab, n, count)
            rows["security space"] = space_run(vm, lab, n, count)
            console.print({k: v for k, v in rows["security space"].items() if k != "ring"})
            rows["guest kprobe event (tracefs)"] = kprobe_run(lab, n, count)
            base_after = bursts(lab, n, count)
    finally:
        labvm.stop(name)
    base = statistics.median(s for _, s in base_before + base_after)
    load = os.getloadavg()[0]
    t1 = Table(title=f"{count} bursts of {n:,} getpid() on {args.kernel} (TCG, 512 MiB, 1 vCPU), "
                     f"kfunc:__x64_sys_getpid comm=vmstest; load average {load:.1f}")  # fmt: skip
    for col in ("run", "events wanted", "delivered", "dropped", "host CPU us/event",
                "guest s per burst (median)", "slowdown", "guest us/event"):  # fmt: skip
        t1.add_column(col, justify="right")
    t1.add_row("unmonitored", "-", "-", "-", "-", f"{base:.4f}", "1x", "-")
    want = (n + 1) * count  # vmstest calls getpid() once more itself, to print its pid
    for label, r in rows.items():
        secs = statistics.median(s for _, s in r["runs"])
        cpu = f"{r['cpu'] / max(r['got'], 1) * 1e6:.2f}" if r["cpu"] else "- (in the guest)"
        cost = f"{(secs - base) / n * 1e6:.2f}"
        t1.add_row(label, f"{want:,}", f"{r['got']:,}", f"{r['dropped']:,}", cpu,
                   f"{secs:.4f}", f"{secs / base:.1f}x", cost)  # fmt: skip
    console.print(t1)
    region = rows["security space"]["ring"]
    if region is not None:
        console.print(f"security space ring: {region.ring_size >> 10} KiB per vCPU "
                      f"({region.ncpus} vCPU)")  # fmt: skip
    console.print(t2)


if __name__ == "__main__":
    main()
