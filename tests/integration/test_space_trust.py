"""A guest kernel attacker cannot blind or fool the security space silently (issue 8, 3).

Real QEMU, real Debian kernels; the attacker is a kernel module loaded in the guest
(generated from the kernel's own crc-itu-t.ko, see vmshield.lab.tampermod) that writes
chosen bytes anywhere in kernel memory. It remaps or unmaps a ring page (writing the
page-table entry through the direct map) and forges the ring counters; each time the
alert must arrive within a check interval, be repaired on `rearm`, and the monitor must
go on reporting. Deep and long paths must not walk around a deny rule, on both engines.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from vmshield.guest.kernel import Kernel
from vmshield.guest.tasks import tasks
from vmshield.hv.target import Target
from vmshield.lab.tampermod import build_tamper_module
from vmshield.monitor.request import IsolationRequest, resolve
from vmshield.monitor.space_engine import SpaceEngine
from vmshield.space import layout as L
from vmshield.space.base import PAGE

from .conftest import Lab
from .monitorlib import MonitorRun, kv
from .test_space import attach, push_module

H = {name: getattr(L.RingHeader, name).offset for name, *_ in L.RingHeader._fields_}


class Armed:
    """A space with file.open armed through the Python API; events collected as dicts."""

    def __init__(self, lab: Lab, t: Target, k: Kernel, eng: SpaceEngine) -> None:
        self.lab, self.t, self.k, self.eng = lab, t, k, eng
        self.events: list[dict[str, Any]] = []
        eng.emit = lambda ev: self.events.append(ev.model_dump())
        self.n = 0

    @property
    def sp(self) -> Any:
        assert self.eng.space is not None and self.eng.space.region is not None
        return self.eng.space

    def tamper(self, address: int, data: bytes) -> None:
        """The attacker: a guest kernel module writes ``data`` at ``address``."""
        self.n += 1
        name = f"vms_r{self.n}"
        blob = build_tamper_module(self.k.release, address, data, name)
        out = push_module(self.lab, blob, name)
        assert "No such device" in out, out  # the init ran, and refused to stay

    def cycle(self, rounds: int = 3) -> None:
        """What the monitor loop does: drain, check (deep), a few times."""
        for _ in range(rounds):
            self.eng._drain_once()
            self.eng._integrity(deep=True)
            time.sleep(self.eng.check_interval)

    def alerts(self, since: int = 0) -> list[dict[str, Any]]:
        return [e["fields"] for e in self.events[since:] if e["object"] == "space.integrity"]

    def opens(self, pid: int, since: int = 0) -> list[dict[str, Any]]:
        """The program's own open of /etc/passwd (exec opens the program file too)."""
        return [e for e in self.events[since:] if e["object"] == "file.open"
                and e["process"]["pid"] == pid
                and e["fields"]["path"] == "/etc/passwd"]  # fmt: skip

    def open_reported(self) -> None:
        """The monitor still reports: a new open gives exactly one event."""
        mark = len(self.events)
        g = kv(self.lab.sh("vmstest open /etc/passwd"))
        self.cycle(2)
        assert len(self.opens(int(g["pid"]), mark)) == 1, self.events[mark:]


@pytest.fixture
def armed(lab: Lab) -> Iterator[Armed]:
    t = Target(lab.name).open()
    k = attach(t)
    req = resolve(IsolationRequest(vm=lab.name, object="file.open"), k)
    eng = SpaceEngine(t, k, [req], lambda ev: None, check_interval=0.2)
    eng.arm()
    a = Armed(lab, t, k, eng)
    try:
        a.cycle(1)
        assert a.alerts() == [], a.alerts()
        yield a
    finally:
        eng.detach()
        t.close()


def pte_va(a: Armed, va: int) -> tuple[int, int]:
    """The kernel virtual address (direct map) and value of the PTE mapping ``va``."""
    _m, chain = a.sp.walker.chain(va)
    at, value = chain[-1]
    base = a.k.u64(a.k.symbols.address("page_offset_base"))
    return base + at, value


def same_entry(now: int, recorded: int) -> bool:
    """Equal page-table entries, the accessed/dirty bits the CPU sets aside."""
    return (now ^ recorded) & ~((1 << 5) | (1 << 6)) == 0


def test_ring_page_remapped_then_unmapped(armed: Armed) -> None:
    a = armed
    r = a.sp.region
    # The header page remapped to a frame of the same ring far ahead (harmless to
    # scribble on): the agent would then publish into a page the host never reads.
    header_pte, good = pte_va(a, r.rings_va)
    # Half a ring ahead of the agent: bytes it will not reach during this test (not the
    # path scratch area at the ring's end, which it writes on every open).
    ahead = (a.sp.ring_header(0).head + r.ring_size // 2) % r.ring_size
    far = (r.rings_va + L.data_offset() + ahead) & ~(PAGE - 1)
    other = r.pa(far)
    forged = (good & ~0x000FFFFFFFFFF000) | other
    mark = len(a.events)
    a.tamper(header_pte, forged.to_bytes(8, "little"))
    a.cycle()
    (alert,) = [f for f in a.alerts(mark) if f["what"] == "pte"]
    assert alert["where"] == "security space ring" and int(alert["address"], 16) == r.rings_va
    assert f"pa={other:#x}" in alert["found"] and alert["response"] == "rearm"
    assert same_entry(a.k.u64(header_pte), good)  # put back, verified
    a.open_reported()

    # A slot page far ahead unmapped (the agent has not reached it: no fault in the guest).
    slot_pte, good = pte_va(a, far)
    mark = len(a.events)
    a.tamper(slot_pte, bytes(8))
    a.cycle()
    # One alert per page the entry mapped: one, or each of a 2 MiB entry's pages (7.x
    # serves the region from huge pages, and a 16 MiB ring keeps some of them whole).
    found = [f for f in a.alerts(mark) if f["what"] == "pte"]
    (alert,) = [f for f in found if int(f["address"], 16) == far]
    assert {int(f["address"], 16) >> 21 for f in found} == {far >> 21}, found[:3]
    assert all("not mapped" in f["found"] and f["response"] == "rearm" for f in found)
    assert same_entry(a.k.u64(slot_pte), good)
    a.open_reported()


def test_forged_ring_counters(armed: Armed) -> None:
    a = armed
    r = a.sp.region
    ring = r.rings_va  # CPU 0 (the lab VM has one vCPU)
    g = kv(a.lab.sh("vmstest open /etc/passwd"))
    a.cycle(1)
    assert len(a.opens(int(g["pid"]))) == 1

    # Head moved backwards: the records below are not shown again.
    head = a.sp.ring_header(0).head
    mark = len(a.events)
    a.tamper(ring + H["head"], (head - 1).to_bytes(8, "little"))
    a.cycle()
    found = a.alerts(mark)
    assert any(f["what"] == "ring-state" and "backwards" in f["found"] for f in found), found
    assert a.opens(int(g["pid"]), mark) == []  # no replay
    a.open_reported()

    # Drop counter saturated: an alert, and the space goes on.
    mark = len(a.events)
    a.tamper(ring + H["drops"], ((1 << 64) - 1).to_bytes(8, "little"))
    a.cycle()
    assert any(f["where"].endswith("drops") for f in a.alerts(mark)), a.events[mark:]
    a.open_reported()

    # Tail set to head: nothing unread may be skipped; the host puts its own tail back.
    mark = len(a.events)
    a.tamper(ring + H["tail"], (a.sp.ring_header(0).head + 5).to_bytes(8, "little"))
    a.cycle()
    assert any(f["where"].endswith("tail") for f in a.alerts(mark)), a.events[mark:]
    a.open_reported()

    # In-flight flag forged: the agent takes every hit for a re-entry and records nothing.
    mark = len(a.events)
    a.tamper(ring + H["inflight"], (1).to_bytes(8, "little"))
    a.cycle(4)
    found = [f for f in a.alerts(mark) if f["where"].endswith("inflight")]
    assert found and found[0]["response"] == "rearm", a.events[mark:]
    a.open_reported()


def test_kernel_half_changed_in_one_process(armed: Armed) -> None:
    """The kernel half of every page directory is a copy of the kernel's own; one entry
    changed in one process's copy is seen by the agent when that process runs into a
    monitoring point (the attacker writes a not-present entry: harmless, but foreign)."""
    a = armed
    k = a.k
    a.lab.sh("rm -f /tmp/pg")
    # The shell writes its own pid on each round: opens in the shell itself (its `sleep`
    # runs in a child, whose directory is a fresh copy of the kernel's).
    loop = "while :; do echo $$ > /tmp/pg; sleep 0.3; done"
    pid = int(a.lab.sh(f"sh -c '{loop}' >/dev/null 2>&1 & echo $!").strip())
    try:
        # `$!` is known once the child is forked, before it has exec'd `sh -c`; exec
        # gives it a new mm and frees the forked directory. The directory is read only
        # once the loop has run (its pid in the file): no exec follows in that process.
        deadline = time.monotonic() + 20
        while a.lab.sh("cat /tmp/pg 2>/dev/null", check=False).strip() != str(pid):
            assert time.monotonic() < deadline, "the loop's shell did not start"
            time.sleep(0.2)
        (task,) = [t for t in tasks(k) if t.pid == pid]
        at_mm = task.address + k.member_offset("task_struct", "mm")
        mm = k.u64(at_mm)
        pgd = k.u64(mm + k.member_offset("mm_struct", "pgd"))
        c = a.sp.config
        ref = a.t.mem.read(a.sp.walker.root, PAGE)
        index = next(i for i in range(c.pgd_lo, 512)
                     if i != c.pgd_ldt and ref[i * 8 : i * 8 + 8] == bytes(8))  # fmt: skip
        entry = pgd + index * 8
        assert k.u64(entry) == 0
        mark = len(a.events)
        a.tamper(entry, (2).to_bytes(8, "little"))
        try:
            # The write landed in the directory the loop's shell runs on, still its own.
            assert k.u64(at_mm) == mm and k.u64(entry) == 2
            # Seen when the loop's shell runs into security_file_open with a sample due:
            # one is due 200 ms after the last; the shell opens 300 ms and more after its
            # `sleep` child's exec (the only other open in the guest), so each of its
            # rounds is sampled. Waited for by the guest's progress, not a fixed time (a
            # loaded host runs a TCG guest slowly): the shell seen sampled since the write
            # with no alert is the agent's miss; the long bound is only for a stuck guest.
            base = k.u64(k.symbols.address("page_offset_base"))
            start = a.sp.ring_header(0).sample.count
            deadline = time.monotonic() + 180
            found: list[dict[str, Any]] = []
            shell_seen = 0
            while not found and time.monotonic() < deadline and shell_seen < 3:
                a.cycle(1)
                found = [f for f in a.alerts(mark) if "page directory" in f["where"]]
                smp = a.sp.ring_header(0).sample
                if smp.count > start and smp.cr3 & 0x000F_FFFF_FFFF_F000 == pgd - base:
                    shell_seen += 1
            smp = a.sp.ring_header(0).sample
            assert found, (hex(entry), hex(smp.cr3), smp.pgd_bad, smp.pgd_index, smp.count - start,
                           shell_seen, a.alerts(mark))  # fmt: skip
            assert found[0]["where"].endswith(f"entry {index}") and found[0]["found"] == "0x2"
            cr3 = int(found[0]["where"].split()[4], 16)  # "cpu N page directory CR3 ..."
            assert cr3 & 0x000F_FFFF_FFFF_F000 == pgd - base  # the shell's own directory
            assert found[0]["response"] == "reported"  # the directory may be gone by now
        finally:
            a.tamper(entry, bytes(8))  # before the kill: the directory is still the shell's
    finally:
        a.lab.sh(f"kill {pid}", check=False)
    a.open_reported()


@pytest.mark.parametrize("engine", ["space", "exit"])
@pytest.mark.parametrize(("depth", "length"), [(100, 8), (500, 10)])
def test_deep_path_cannot_walk_around_a_deny_rule(
    lab: Lab, engine: str, depth: int, length: int
) -> None:
    """`file.open,path=/tmp/*,action=deny`: a path of 900 bytes and 101 components (too
    long for a record, deeper than the old 64-component bound), and one of 5500 bytes
    (beyond PATH_MAX, reached by relative opens) are denied like any other under /tmp."""
    root = f"/tmp/vd{depth}"
    lab.sh(f"rm -rf {root}", check=False)
    mon = MonitorRun(lab.name, ["-o", "file.open,path=/tmp/*,action=deny"], engine=engine)
    try:
        g = kv(lab.sh(f"vmstest deep {root} {depth} {length}", check=False))
        assert int(g["path_len"]) > 400 and int(g["depth"]) > 64
        assert g["errno"] == "1", g  # EPERM
        ev = mon.wait_for(lambda e: e["object"] == "file.open"
                          and e["process"]["pid"] == int(g["pid"]))  # fmt: skip
        assert ev["action"] == "deny"
        assert kv(lab.sh("vmstest open /etc/passwd"))["errno"] == "0"  # others are not
    finally:
        assert mon.stop() == 0, "".join(mon.stderr)
    path = ev["fields"]["path"]
    if engine == "exit" or int(g["path_len"]) < 4096:
        assert path.startswith(f"{root}/"), path  # the root-most part is kept
    if engine == "exit":
        assert len(path) == int(g["path_len"]) and "path_truncated" not in ev["fields"]
    else:
        assert ev["fields"]["path_truncated"] is True and ev["decode_errors"]
    lab.sh(f"rm -rf {root}", check=False)
