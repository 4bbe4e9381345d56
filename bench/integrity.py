"""Sensitive-module isolation: detection latency per rootkit technique and engine, and
the host CPU cost of the integrity checks.

Boots one lab VM (``--kernel``, default 6.1, 2 vCPUs), then for each engine arms every
integrity object (``restore`` where it applies) and runs each technique of
:mod:`vmshield.lab.rootkit`: the latency is from the moment ``insmod`` returns (the
write is done) to the event, so it is bounded by the check interval. The cost is the
CPU time the monitor thread spends in checks (``time.thread_time`` around each check,
so other threads are not counted; the system call tables and the IDT are also read at
every loop turn), per second of monitoring at the given interval, and per GiB of guest
memory watched (kernel text, read-only data, tables) per second.
A soak of ordinary self-patching activity (``--soak`` seconds, default 600) must raise
nothing; its length and the findings are printed.

Run: ``.venv/bin/python bench/integrity.py [--kernel 6.1] [--interval 1] [--soak 600]``.
"""

from __future__ import annotations

import argparse
import base64
import os
import tempfile
import threading
import time

from rich.console import Console
from rich.table import Table

import vmshield
from vmshield.guest.modules import modules
from vmshield.lab import rootkit
from vmshield.lab import vm as labvm
from vmshield.lab.tampermod import build_resident_module, build_tamper_module
from vmshield.monitor.events import Event
from vmshield.paths import kernels_dir

TECHNIQUES = rootkit.DETECTED_BY
BUSY = 40  # seconds of kernel-heavy load on both vCPUs while an MSR change is awaited


def sh(name: str, cmd: str, timeout: float = 120) -> str:
    res = labvm.LabVM(name).run(cmd, timeout)
    return res.output


def push(name: str, data: bytes, path: str) -> None:
    b64 = base64.b64encode(data).decode()
    sh(name, f"rm -f {path}.b64")
    for i in range(0, len(b64), 2000):
        sh(name, f"printf '%s' {b64[i : i + 2000]} >> {path}.b64")
    sh(name, f"base64 -d {path}.b64 > {path} && rm {path}.b64")


def write(name: str, kernel: str, w: rootkit.Write, mod: str) -> None:
    ko = build_tamper_module(kernel, w.address, w.data, name=mod,
                             keep_wp_clear=w.keep_wp_clear, unlink=w.unlink,
                             msr=w.msr)  # fmt: skip
    push(name, ko, f"/tmp/{mod}.ko")
    sh(name, f"insmod /tmp/{mod}.ko")


def run_engine(name: str, kernel: str, engine: str, interval: float) -> dict[str, object]:
    events: list[tuple[float, Event]] = []
    cv = threading.Condition()

    def add(ev: Event) -> None:
        with cv:
            events.append((time.monotonic(), ev))
            cv.notify_all()

    out: dict[str, object] = {}
    with vmshield.open_vm(name) as vm:
        reqs = [vmshield.IsolationRequest(vm=name, object=o,
                                          action="log" if t == "hide" else "restore")
                for t, o in TECHNIQUES.items()]  # fmt: skip
        if engine == "space":
            reqs.append(vmshield.IsolationRequest(vm=name, object="file.unlink",
                                                  filters={"path": "/nonexistent/*"}))  # fmt: skip
        with vmshield.Monitor(vm, reqs, engine=engine, check_interval=interval) as mon:
            mon.subscribe(add)
            started = time.monotonic()
            k = vm.kernel
            for tech, obj in TECHNIQUES.items():
                if tech == "hide":
                    if engine != "exit":  # hidden once per boot (the exit run did it)
                        continue
                    ko = (kernels_dir() / kernel / "modules" / "crc-itu-t.ko").read_bytes()
                    push(name, ko, "/tmp/crc.ko")
                    sh(name, "insmod /tmp/crc.ko")
                    w = rootkit.hide_module(k, "crc_itu_t")
                elif tech == "lstar":
                    # The probe reads a vCPU that runs kernel code: keep both busy in it.
                    text = rootkit.lstar_trampoline(k)
                    mod = f"vms_btramp_{engine}"
                    push(name, build_resident_module(kernel, text, name=mod), f"/tmp/{mod}.ko")
                    sh(name, f"insmod /tmp/{mod}.ko")
                    base = next(m.base for m in modules(k) if m.name == mod)
                    w = rootkit.redirect_lstar(base)
                    loop = (
                        f"end=$(($(date +%s)+{BUSY})); while [ $(date +%s) -lt $end ]; "
                        "do dd if=/dev/zero of=/dev/null bs=1M count=20 2>/dev/null; done"
                    )
                    sh(name, f"for j in 1 2; do ( {loop} ) >/dev/null 2>&1 & done; true")
                elif tech == "rodata":
                    w = rootkit.patch_rodata(k)
                elif tech == "hook":
                    w = rootkit.hook_syscall(k)
                elif tech == "patch":
                    w = rootkit.patch_function(k)[0]
                elif tech == "idt":
                    w = rootkit.change_idt(k)
                else:
                    w = rootkit.clear_wp(k)
                write(name, kernel, w, f"vms_b{tech}")
                done = time.monotonic()

                def arrived(o: str = obj) -> bool:
                    return any(e.object == o for _, e in events)

                with cv:
                    cv.wait_for(arrived, BUSY if tech == "lstar" else 30)
                    hit = [t for t, e in events if e.object == obj]
                out[tech] = f"{hit[0] - done:.2f}" if hit else "missed"
            ck = mon.checker
            assert ck is not None
            time.sleep(5 * interval)
            out["checks"] = ck.stats.checks
            out["cpu/s"] = ck.stats.check_seconds / (time.monotonic() - started)
            out["stopped/s"] = ck.stats.stopped_seconds / (time.monotonic() - started)
            out["MiB watched"] = ck.stats.bytes_watched / (1 << 20)
    return out


def soak(name: str, kernel: str, seconds: float, interval: float) -> tuple[int, list[Event]]:
    found: list[Event] = []
    rounds = 0
    tr = "/sys/kernel/tracing"
    with vmshield.open_vm(name) as vm:
        reqs = [vmshield.IsolationRequest(vm=name, object=o) for o in TECHNIQUES.values()]
        with vmshield.Monitor(vm, reqs, engine="exit", check_interval=interval) as mon:
            mon.subscribe(found.append)
            ko = (kernels_dir() / kernel / "modules" / "crc-itu-t.ko").read_bytes()
            push(name, ko, "/tmp/soak.ko")
            sh(name, f"mount -t tracefs nodev {tr} 2>/dev/null; true")
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                sh(name,
                   "insmod /tmp/soak.ko && rmmod crc_itu_t;"
                   f"echo 'p:vms_soak do_sys_openat2' > {tr}/kprobe_events;"
                   f"echo 1 > {tr}/events/kprobes/vms_soak/enable; cat /etc/hostname;"
                   f"echo 0 > {tr}/events/kprobes/vms_soak/enable; echo > {tr}/kprobe_events;"
                   f"echo 'do_sys_openat2 vfs_read' > {tr}/set_ftrace_filter;"
                   f"echo function > {tr}/current_tracer; cat /etc/hostname;"
                   f"echo nop > {tr}/current_tracer; echo > {tr}/set_ftrace_filter;"
                   "echo 1 > /proc/sys/kernel/sched_schedstats;"
                   "echo 0 > /proc/sys/kernel/sched_schedstats")  # fmt: skip
                rounds += 1
            time.sleep(2 * interval)
    return rounds, found


def latency_table(console: Console, kernel: str, interval: float) -> None:
    name = f"bench-integ-{kernel}"
    labvm.start(name, kernel, cpus=2)
    try:
        rows = {e: run_engine(name, kernel, e, interval) for e in ("exit", "space")}
    finally:
        labvm.stop(name)
    table = Table(title=f"detection latency, s after the write (kernel {kernel}, "
                        f"check every {interval} s)")  # fmt: skip
    table.add_column("engine")
    for t in TECHNIQUES:
        table.add_column(t, justify="right")
    for col in ("full checks", "check CPU s per s", "per GiB watched", "VM stopped s per s"):
        table.add_column(col, justify="right")
    for eng, r in rows.items():
        per_s = float(str(r["cpu/s"]))
        gib = float(str(r["MiB watched"])) / 1024
        table.add_row(eng, *(str(r.get(t, "-")) for t in TECHNIQUES), str(r["checks"]),
                      f"{per_s:.4f}", f"{per_s / gib:.4f}",
                      f"{float(str(r['stopped/s'])):.4f}")  # fmt: skip
    console.print(table)
    console.print(f"watched {rows['exit']['MiB watched']:.1f} MiB of guest memory")


def soak_main(console: Console, kernel: str, seconds: float, interval: float) -> None:
    name = f"bench-soak-{kernel}"
    labvm.start(name, kernel, cpus=1)  # 2 TCG vCPUs stall on this workload
    try:
        rounds, found = soak(name, kernel, seconds, interval)
    finally:
        labvm.stop(name)
    console.print(f"soak {seconds:.0f} s: {rounds} rounds of module load/unload, "
                  f"kprobe, function tracer, static key; {len(found)} finding(s)")  # fmt: skip
    for ev in found:
        console.print(ev.to_json(), highlight=False, soft_wrap=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--kernel", default="6.1")
    ap.add_argument("--interval", type=float, default=1.0)
    ap.add_argument("--soak", type=float, default=600.0)
    ap.add_argument("--soak-only", action="store_true", help="skip the latency table")
    args = ap.parse_args()
    os.environ.setdefault("VMSHIELD_RUN", tempfile.mkdtemp(prefix="vmshield-bench-"))
    console = Console(width=200)  # the table is wide: never cut to a pipe's 80 columns
    if not args.soak_only:
        latency_table(console, args.kernel, args.interval)
    if args.soak > 0:
        soak_main(console, args.kernel, args.soak, args.interval)


if __name__ == "__main__":
    main()
