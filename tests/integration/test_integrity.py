"""Sensitive-module isolation (issue 13) on real guests: each rootkit technique is
reported with what changed, where, the old and new values, and ``restore`` undoes it
while the guest keeps running; ordinary guest activity that makes the kernel patch
itself (module load and unload, a kprobe, the function tracer, a static key) raises
nothing.

Trimmed for the CI budget (TCG guests, two cores): every technique on both engines on
6.1; the system call hook with restore on every lab kernel on the exit engine; a short
soak on 6.1 (``bench/integrity.py`` runs the long one).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import pytest

import vmshield
from vmshield.lab import rootkit
from vmshield.lab.kernels import KNOWN_KERNELS
from vmshield.lab.tampermod import build_tamper_module
from vmshield.monitor.events import Event
from vmshield.paths import kernels_dir

from .conftest import Lab, boot
from .test_tampermod import assert_healthy, push

OBJECTS = {
    "hook": "kernel.syscall_table",
    "patch": "kernel.text",
    "idt": "kernel.idt",
    "wp": "cpu.control",
    "hide": "kernel.modules",
}
WAIT = 20.0  # seconds a finding may take (TCG guest, 1 s check interval)


def run_write(lab: Lab, w: rootkit.Write, name: str) -> None:
    """Carry out one technique with a generated tamper module (its init fails on purpose)."""
    ko = build_tamper_module(lab.kernel, w.address, w.data, name=name,
                             keep_wp_clear=w.keep_wp_clear, unlink=w.unlink)  # fmt: skip
    push(lab, ko, f"/tmp/{name}.ko")
    res = lab.vm.run(f"insmod /tmp/{name}.ko", 60)
    assert res.status != 0 and "No such device" in res.output, res.output


class Seen:
    """Events of a monitor, waited for by object."""

    def __init__(self, mon: vmshield.Monitor) -> None:
        self.events: list[Event] = []
        self.cv = threading.Condition()
        mon.subscribe(self._add)

    def _add(self, ev: Event) -> None:
        with self.cv:
            self.events.append(ev)
            self.cv.notify_all()

    def wait(self, obj: str, timeout: float = WAIT) -> Event:
        end = time.monotonic() + timeout
        with self.cv:
            while True:
                hit = [e for e in self.events if e.object == obj]
                if hit:
                    return hit[0]
                left = end - time.monotonic()
                if left <= 0:
                    pytest.fail(f"no {obj} event within {timeout} s; got {self.events}")
                self.cv.wait(left)


def settled(check: Callable[[], bool], timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while not check():
        if time.monotonic() > end:
            return False
        time.sleep(0.2)
    return True


def technique(lab: Lab, vm: vmshield.VM, name: str) -> tuple[int, bytes]:
    """Run technique ``name``; returns (address, original bytes) for the restore check."""
    k = vm.kernel
    if name == "hook":
        w = rootkit.hook_syscall(k)
    elif name == "patch":
        w, _fn = rootkit.patch_function(k)
    elif name == "idt":
        w = rootkit.change_idt(k)
    elif name == "wp":
        w = rootkit.clear_wp(k)
    else:
        ko = (kernels_dir() / lab.kernel / "modules" / "crc-itu-t.ko").read_bytes()
        push(lab, ko, "/tmp/crc-itu-t.ko")
        lab.sh("insmod /tmp/crc-itu-t.ko")
        w = rootkit.hide_module(k, "crc_itu_t")
    before = k.read(w.address, len(w.data)) if not w.unlink else b""
    run_write(lab, w, f"vms_{name}")
    return w.address, before


def monitor(vm: vmshield.VM, engine: str, names: list[str]) -> vmshield.Monitor:
    reqs = [
        vmshield.IsolationRequest(
            vm=vm.name, object=OBJECTS[n], action="log" if n == "hide" else "restore"
        )
        for n in names
    ]
    if engine == "space":  # the space serves behaviour objects; add one that never fires
        reqs.append(vmshield.IsolationRequest(vm=vm.name, object="file.unlink",
                                              filters={"path": "/nonexistent/*"}))  # fmt: skip
    return vmshield.Monitor(vm, reqs, engine=engine, check_interval=1.0)


@pytest.fixture(scope="module")
def lab61() -> Iterator[Lab]:
    yield from boot("6.1", "integ-6.1", cpus=2)


@pytest.mark.parametrize("engine", ["exit", "space"])
def test_every_technique_is_reported_and_restored(lab61: Lab, engine: str) -> None:
    names = ["hook", "patch", "idt", "wp", "hide"]
    with vmshield.open_vm(lab61.name) as vm, monitor(vm, engine, names) as mon:
        assert mon.engine_kind == engine
        seen = Seen(mon)
        for name in names:
            hidden = "crc_itu_t" in lab61.sh("ls /sys/module") and "crc_itu_t" not in (
                lab61.sh("cat /proc/modules")
            )
            if name == "hide" and hidden:
                # Hidden by an earlier run in this guest: reported at the first check.
                ev = seen.wait("kernel.modules")
            else:
                address, before = technique(lab61, vm, name)
                ev = seen.wait(OBJECTS[name])
            f = ev.fields
            assert ev.point.engine == engine and ev.point.kind == "integrity-check"
            assert f["where"] and f["old"] != f["new"], f
            if name == "hide":
                assert f["module"] == "crc_itu_t" and f["what"] == "hidden-module"
                assert "crc_itu_t" not in lab61.sh("cat /proc/modules")
                continue
            assert f["response"] == "restored" and f["count"] >= 1, f
            if name == "wp":
                assert f["bit"] == "WP" and "cpu" in f
                assert all(c.cr0 & 1 << 16 for c in vm.target.cpus())
            else:  # really put back (the event may leave before the guest's last store)
                assert settled(lambda a=address, b=before: vm.kernel.read(a, len(b)) == b), (
                    name,
                    f,
                    vm.kernel.read(address, len(before)).hex(),
                    before.hex(),
                )
            if name == "hook":
                assert f["old_symbol"].endswith("sys_getpid")
                assert f["new_symbol"].endswith("sys_getppid")
            assert_healthy(lab61)
        assert mon.checker is not None and mon.checker.stats.restored >= 4


def test_a_change_made_again_is_restored_again_and_counted(lab61: Lab) -> None:
    with vmshield.open_vm(lab61.name) as vm, monitor(vm, "exit", ["hook"]) as mon:
        seen = Seen(mon)
        technique(lab61, vm, "hook")
        seen.wait("kernel.syscall_table")
        seen.events.clear()
        technique(lab61, vm, "hook")
        ev = seen.wait("kernel.syscall_table")
        assert ev.fields["count"] == 2 and ev.fields["response"] == "restored"


@pytest.mark.parametrize("kernel", [k for k in KNOWN_KERNELS if k != "6.1"])
def test_syscall_hook_restored_on_every_kernel(kernel: str) -> None:
    for lab in boot(kernel, f"integ-{kernel}"):
        with vmshield.open_vm(lab.name) as vm, monitor(vm, "exit", ["hook", "patch"]) as mon:
            seen = Seen(mon)
            address, before = technique(lab, vm, "hook")
            ev = seen.wait("kernel.syscall_table")
            assert ev.fields["response"] == "restored"
            assert settled(lambda a=address, b=before: vm.kernel.read(a, 8) == b)
            assert lab.sh("echo ok").strip() == "ok"
            assert not [e for e in seen.events if e.object == "kernel.text"], seen.events


SOAK_SECONDS = 60.0


@pytest.fixture(scope="module")
def soak61() -> Iterator[Lab]:
    # One vCPU: with two, this workload stalls a TCG guest's console with or without a
    # monitor (seen after about 30 rounds).
    yield from boot("6.1", "integsoak-6.1", cpus=1)  # no technique ever ran in it


def test_soak_of_self_patching_raises_nothing(soak61: Lab) -> None:
    """Module load and unload, a kprobe, the function tracer and a static key (the
    scheduler's ``sched_schedstats``), repeated for a minute: no finding."""
    lab61 = soak61
    objs = ["patch", "hook", "idt", "wp", "hide"]
    with vmshield.open_vm(lab61.name) as vm, monitor(vm, "exit", objs) as mon:
        mon.subscribe(lambda ev: print("FINDING", ev.to_json()))
        seen = Seen(mon)
        ko = (kernels_dir() / lab61.kernel / "modules" / "crc-itu-t.ko").read_bytes()
        push(lab61, ko, "/tmp/soak.ko")
        lab61.sh("mount -t tracefs nodev /sys/kernel/tracing 2>/dev/null; true")
        tr = "/sys/kernel/tracing"
        end = time.monotonic() + SOAK_SECONDS
        rounds = 0
        while time.monotonic() < end:
            lab61.sh(
                "insmod /tmp/soak.ko && rmmod crc_itu_t;"
                f"echo 'p:vms_soak do_sys_openat2' > {tr}/kprobe_events;"
                f"echo 1 > {tr}/events/kprobes/vms_soak/enable; cat /etc/hostname >/dev/null;"
                f"echo 0 > {tr}/events/kprobes/vms_soak/enable; echo > {tr}/kprobe_events;"
                # The function tracer on a few functions (all of them make a TCG guest
                # too slow to answer its console): the same enable/disable path.
                f"echo 'do_sys_openat2 vfs_read' > {tr}/set_ftrace_filter;"
                f"echo function > {tr}/current_tracer; cat /etc/hostname >/dev/null;"
                f"echo nop > {tr}/current_tracer; echo > {tr}/set_ftrace_filter;"
                "echo 1 > /proc/sys/kernel/sched_schedstats;"
                "echo 0 > /proc/sys/kernel/sched_schedstats",
                timeout=120,
            )
            rounds += 1
        time.sleep(3)  # one more check after the last round
        assert mon.checker is not None and mon.checker.stats.checks >= 10
        assert seen.events == [], seen.events
        assert rounds >= 1
