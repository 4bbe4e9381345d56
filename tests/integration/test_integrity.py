"""Sensitive-module isolation (issue 13) on real guests: each rootkit technique is
reported with what changed, where, the old and new values, and ``restore`` undoes it
while the guest keeps running; ordinary guest activity that makes the kernel patch
itself (module load and unload, a kprobe, the function tracer, a static key) raises
nothing.

Trimmed for the CI budget (TCG guests, two cores): one booted VM per lab kernel, every
technique on both engines in one test per kernel and engine (a change made again is
restored again and counted, module text and ``space.self`` as requested objects
included); a short soak on 6.1 (``bench/integrity.py`` runs the long one).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import pytest

import vmshield
from vmshield.guest.modules import modules
from vmshield.lab import rootkit
from vmshield.lab.kernels import KNOWN_KERNELS
from vmshield.lab.tampermod import build_resident_module, build_tamper_module
from vmshield.monitor.events import Event
from vmshield.paths import kernels_dir

from .conftest import Lab, boot
from .test_tampermod import assert_healthy, push

OBJECTS = rootkit.DETECTED_BY
WAIT = 30.0  # seconds a finding may take (TCG guest, 1 s check interval)
BUSY = 40  # seconds of kernel-heavy load on every vCPU while an MSR change is awaited
ENTRY_NOP = bytes.fromhex("0f1f440000")  # the 5-byte nop of an unpatched ftrace site


def run_write(lab: Lab, w: rootkit.Write, name: str) -> None:
    """Carry out one technique with a generated tamper module (its init fails on purpose)."""
    ko = build_tamper_module(lab.kernel, w.address, w.data, name=name,
                             keep_wp_clear=w.keep_wp_clear, unlink=w.unlink,
                             msr=w.msr)  # fmt: skip
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

    def of(self, obj: str) -> list[Event]:
        with self.cv:
            return [e for e in self.events if e.object == obj]

    def wait(self, obj: str, timeout: float = WAIT, n: int = 1, what: str = "") -> Event:
        """The ``n``-th event of ``obj`` (whose ``what`` is ``what``, if given)."""
        end = time.monotonic() + timeout
        with self.cv:
            while True:
                hit = [e for e in self.events if e.object == obj
                       and what in ("", e.fields.get("what"))]  # fmt: skip
                if len(hit) >= n:
                    return hit[n - 1]
                left = end - time.monotonic()
                if left <= 0:
                    pytest.fail(f"no {obj} event #{n} within {timeout} s; got {self.events}")
                self.cv.wait(left)


def settled(check: Callable[[], bool], timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while not check():
        if time.monotonic() > end:
            return False
        time.sleep(0.2)
    return True


def busy(lab: Lab, seconds: int) -> None:
    """Keep both vCPUs in the kernel for a while (the MSR probe skips halted vCPUs and
    user mode): ``dd`` from /dev/zero, in the background, ending by itself."""
    loop = (f"end=$(($(date +%s)+{seconds})); while [ $(date +%s) -lt $end ]; do "
            "dd if=/dev/zero of=/dev/null bs=1M count=20 2>/dev/null; done")  # fmt: skip
    lab.sh(f"for j in 1 2; do ( {loop} ) >/dev/null 2>&1 & done; true")


def resident_trampoline(lab: Lab, vm: vmshield.VM, name: str) -> int:
    """Load a module holding the LSTAR trampoline; returns its address."""
    k = vm.kernel
    text = rootkit.lstar_trampoline(k)
    push(lab, build_resident_module(lab.kernel, text, name=name), f"/tmp/{name}.ko")
    lab.sh(f"insmod /tmp/{name}.ko")
    base = next(m.base for m in modules(k) if m.name == name)
    k.walker.flush()  # module-area addresses are reused: no stale translation
    assert k.read(base, len(text)) == text
    return base


def write_for(lab: Lab, vm: vmshield.VM, name: str, engine: str) -> rootkit.Write:
    k = vm.kernel
    if name == "hook":
        return rootkit.hook_syscall(k)
    if name == "patch":
        return rootkit.patch_function(k)[0]
    if name == "idt":
        return rootkit.change_idt(k)
    if name == "wp":
        return rootkit.clear_wp(k)
    if name == "rodata":
        return rootkit.patch_rodata(k)
    if name == "lstar":
        return rootkit.redirect_lstar(resident_trampoline(lab, vm, f"vms_tramp_{engine}"))
    ko = (kernels_dir() / lab.kernel / "modules" / "crc-itu-t.ko").read_bytes()
    push(lab, ko, "/tmp/crc-itu-t.ko")
    lab.sh("insmod /tmp/crc-itu-t.ko")
    return rootkit.hide_module(k, "crc_itu_t")


def monitor(
    vm: vmshield.VM,
    engine: str,
    objects: list[str],
    extra: tuple[vmshield.IsolationRequest, ...] = (),
) -> vmshield.Monitor:
    reqs = [vmshield.IsolationRequest(vm=vm.name, object=o,
                                      action="log" if o == "kernel.modules" else "restore")
            for o in objects]  # fmt: skip
    reqs += list(extra)
    if engine == "space":  # the space serves behaviour objects; add one that never fires
        reqs.append(vmshield.IsolationRequest(vm=vm.name, object="file.unlink",
                                              filters={"path": "/nonexistent/*"}))  # fmt: skip
        reqs.append(vmshield.IsolationRequest(vm=vm.name, object="space.self"))
    return vmshield.Monitor(vm, reqs, engine=engine, check_interval=1.0)


@pytest.fixture(scope="module", params=KNOWN_KERNELS)
def integ_lab(request: pytest.FixtureRequest) -> Iterator[Lab]:
    # Two vCPUs: MSRs and control registers are per vCPU. (7.3 once failed to arm the
    # space with two, a per-cpu address "not mapped": the walker's stale root, fixed.)
    yield from boot(request.param, f"integ-{request.param}", cpus=2)


def hidden(lab: Lab) -> bool:
    return "crc_itu_t" in lab.sh("ls /sys/module") and "crc_itu_t" not in lab.sh(
        "cat /proc/modules"
    )


@pytest.mark.parametrize("engine", ["exit", "space"])
def test_every_technique_on_every_kernel(integ_lab: Lab, engine: str) -> None:
    """Every technique in turn, each reported with its fields and (``restore``) undone
    while the guest runs on; the system call hook twice (restored again, counted);
    then the module text of the trampoline module as its own request and, on the
    space engine, the space itself (``space.self``)."""
    lab = integ_lab
    names = list(OBJECTS)
    with vmshield.open_vm(lab.name) as vm, monitor(vm, engine, list(OBJECTS.values())) as mon:
        assert mon.engine_kind == engine
        seen = Seen(mon)
        for name in names:
            obj = OBJECTS[name]
            if name == "hide" and hidden(lab):
                ev = seen.wait(obj, what="hidden-module")  # hidden by the other run: seen at once
            else:
                w = write_for(lab, vm, name, engine)
                before = b"" if w.unlink or w.msr else vm.kernel.read(w.address, len(w.data))
                if name == "lstar":
                    busy(lab, BUSY)
                run_write(lab, w, f"vms_{name}")
                ev = seen.wait(obj, timeout=BUSY if name == "lstar" else WAIT,
                               what="hidden-module" if name == "hide" else "")  # fmt: skip
            f = ev.fields
            assert ev.point.engine == engine and ev.point.kind == "integrity-check", ev
            assert f["where"] and f["old"] != f["new"], f
            if name == "hide":
                assert f["module"] == "crc_itu_t", f
                assert "mod_tree" in f["new"] and "module_kset" in f["new"], f
                assert "crc_itu_t" not in lab.sh("cat /proc/modules")
                continue
            assert f["response"] == "restored" and f["count"] >= 1, f
            if name == "wp":  # really set again: soon the checks find nothing more
                assert f["bit"] == "WP" and "cpu" in f
                # 7.3-exit once found WP clear again after the first restore (count 2,
                # restored again, then it stayed): a repeat is allowed if it settles.
                time.sleep(8)
                evs = seen.of(obj)
                assert all(e.fields["response"] == "restored" for e in evs), evs
                assert time.time() - evs[-1].time > 4, repr([e.fields for e in evs])[:3000]
            elif name == "lstar":
                assert f["register"] == "lstar" and "cpu" in f, f
                assert f["old_symbol"] == "entry_SYSCALL_64" and int(f["new"], 16) == w.address
                # Really put back: the probe, still reading under load, soon finds nothing
                # more (7.3 once showed the redirect again after the first restore).
                time.sleep(8)
                evs = seen.of(obj)
                assert all(e.fields["response"] == "restored" for e in evs), evs
                assert time.time() - evs[-1].time > 4, repr([e.fields for e in evs])[:3000]
            else:  # really put back (the event may leave before the guest's last store)
                a, b = w.address, before
                assert settled(lambda a=a, b=b: vm.kernel.read(a, len(b)) == b), (name, f)
            if name == "hook":
                assert f["old_symbol"].endswith("sys_getpid")
                assert f["new_symbol"].endswith("sys_getppid")
                # Made again: restored again, counted (the tamper module stores byte by
                # byte, so one write may already have been seen more than once).
                time.sleep(2)
                n, last = len(seen.of(obj)), seen.of(obj)[-1].fields["count"]
                run_write(lab, w, "vms_hook2")
                again = seen.wait(obj, n=n + 1).fields
                assert again["count"] > last and again["response"] == "restored", again
            assert_healthy(lab)
        if engine == "space":
            site = next(r.point.address for r in mon.resolved if r.obj.name == "file.unlink")
            run_write(lab, rootkit.Write(site, ENTRY_NOP), "vms_self")
            ev = seen.wait("space.self", what="site")  # (table alerts came before)
            assert ev.request != "space" and ev.fields["response"] == "as --on-tamper", ev
        assert mon.checker is not None and mon.checker.stats.restored >= 7
        # Nothing else: no unreadable structure, no executable memory without an owner
        # (the trampoline module and the tamper modules are the kernel's own books).
        extra = [
            e
            for e in seen.events
            if e.fields.get("what") in ("unreadable", "executable-allocation")
        ]
        assert not extra, repr([e.fields for e in extra])[:3000]
    # Module text as a request of its own: the trampoline module's first bytes.
    mod = f"vms_tramp_{engine}"
    req = vmshield.IsolationRequest(vm=lab.name, object="kernel.text",
                                    filters={"module": mod}, action="restore")  # fmt: skip
    with (
        vmshield.open_vm(lab.name) as vm,
        monitor(vm, engine, [], extra=(req,)) as mon,
    ):
        seen = Seen(mon)
        assert mon.checker is not None  # its reference found the module (walked again if need be)
        base = next(r.va for r in mon.checker.regions if r.name == mod)
        vm.kernel.walker.flush()
        before = vm.kernel.read(base, 2)
        run_write(lab, rootkit.Write(base, b"\xeb\xfe"), "vms_modtext")  # jmp $ (never run)
        f = seen.wait("kernel.text").fields
        assert f["region"] == mod and f["response"] == "restored", f
        assert settled(lambda: vm.kernel.read(base, 2) == before)
        assert_healthy(lab)


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
    objs = list(OBJECTS.values())  # every object (kernel.modules without exec=on)
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
