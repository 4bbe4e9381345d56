"""The MSR probe and the exit engine's check at a stop, against a scripted gdbstub and a
small guest memory: the probe steps one ``rdmsr``/``wrmsr`` and leaves registers and
padding exactly as they were, skips what it must not step (user mode, a halted vCPU),
and a stop check reports and restores what changed, at most every STOP_CHECK_GAP."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmshield.errors import SymbolError, VmshieldError
from vmshield.hv.gdbpackets import X86Registers
from vmshield.hv.target import CpuState
from vmshield.monitor import integrity as integ
from vmshield.monitor.events import Event
from vmshield.monitor.msrprobe import MSRS, RDMSR, MsrProbe, ProbeSkipped
from vmshield.monitor.request import IsolationRequest

TEXT = 0xFFFF_FFFF_8100_0000
PAD_FN = TEXT + 0x100  # "kernel_halt", with int3 padding before it
TABLE = TEXT + 0x1000  # "sys_call_table", 4 entries
ENTRY = TEXT + 0x200  # "entry_SYSCALL_64"
CR0_WP = 1 << 16


class Sym:
    def __init__(self, name: str, address: int) -> None:
        self.name, self.address = name, address


class Symbols:
    def __init__(self, table: dict[str, int]) -> None:
        self.t = table

    def __contains__(self, name: object) -> bool:
        return name in self.t

    def address(self, name: str) -> int:
        if name not in self.t:
            raise SymbolError(f"no symbol {name}")
        return self.t[name]

    def extent(self, name: str, default: int) -> tuple[int, int]:
        return self.t[name], 32

    def lookup(self, va: int) -> tuple[Sym, int] | None:
        for n, a in self.t.items():
            if a == va:
                return Sym(n, a), 0
        return None


class Kernel:
    """Guest memory as a dict of bytes; anything else is unreadable."""

    def __init__(self) -> None:
        self.mem: dict[int, int] = {}
        self.symbols = Symbols({"kernel_halt": PAD_FN, "sys_call_table": TABLE,
                                "entry_SYSCALL_64": ENTRY})  # fmt: skip
        self.put(TEXT, b"\x90" * 0x2000)
        self.put(PAD_FN - 4, b"\xcc" * 4)
        for i in range(4):
            self.put(TABLE + 8 * i, (TEXT + 0x400 + 16 * i).to_bytes(8, "little"))

    def put(self, va: int, data: bytes) -> None:
        for i, b in enumerate(data):
            self.mem[va + i] = b

    def read(self, va: int, n: int) -> bytes:
        try:
            return bytes(self.mem[va + i] for i in range(n))
        except KeyError:
            raise VmshieldError(f"unreadable {va:#x}") from None

    def u64(self, va: int) -> int:
        return int.from_bytes(self.read(va, 8), "little")

    def member_offset(self, struct: str, member: str) -> int:
        return 0

    @property
    def walker(self) -> Kernel:
        return self  # translate: identity (the dict is both views)

    def translate(self, va: int) -> int:
        return va

    def flush(self) -> None:
        pass  # no cached translations

    def write(self, pa: int, data: bytes) -> None:
        self.put(pa, data)


def regs(**kw: int) -> X86Registers:
    base = dict.fromkeys(f.name for f in dataclasses.fields(X86Registers)
                         if f.name not in ("tail", "origin"))  # fmt: skip
    values: dict[str, Any] = {n: 0 for n in base}
    values.update(rip=TEXT + 0x10, cs=0x10, cr0=0x8005_0033, cr4=0x3406F0, efer=0xD01)
    values.update(kw)
    return X86Registers(**values)


class Stub:
    """A gdbstub whose vCPUs execute only ``rdmsr`` and ``wrmsr`` when stepped."""

    def __init__(self, k: Kernel, cpus: list[X86Registers]) -> None:
        self.k, self.cpus = k, cpus
        self.msrs = [{m: (ENTRY if n == "lstar" else 0x10 + m) for n, m in MSRS.items()}
                     for _ in cpus]  # fmt: skip
        self.sel = 1
        self.halted: set[int] = set()
        self.writes: list[tuple[str, int, int]] = []

    def threads(self) -> list[int]:
        return [i + 1 for i in range(len(self.cpus))]

    def select_thread(self, tid: int) -> None:
        self.sel = tid

    def read_registers(self) -> X86Registers:
        return dataclasses.replace(self.cpus[self.sel - 1])

    def write_registers(self, r: X86Registers, **_: Any) -> None:
        self.cpus[self.sel - 1] = dataclasses.replace(r, origin=None)

    def write_register(self, name: str, value: int) -> None:
        self.writes.append((name, self.sel - 1, value))
        setattr(self.cpus[self.sel - 1], name, value)

    def write_memory(self, va: int, data: bytes) -> None:
        self.k.put(va, data)

    def step_thread(self, tid: int, timeout: float) -> None:
        from vmshield.hv.gdbpackets import GdbTimeout

        if tid - 1 in self.halted:
            raise GdbTimeout("halted")
        r = self.cpus[tid - 1]
        code = self.k.read(r.rip, 2)
        msrs = self.msrs[tid - 1]
        if code == RDMSR:
            v = msrs[r.rcx]
            r.rax, r.rdx = v & 0xFFFF_FFFF, v >> 32
        else:
            msrs[r.rcx] = (r.rdx << 32) | (r.rax & 0xFFFF_FFFF)
        r.rip += 2

    def interrupt(self) -> None:
        pass

    def wait_stop(self, timeout: float) -> None:
        pass


class Target:
    name = "unit"

    def __init__(self, cpus: list[X86Registers], k: Kernel) -> None:
        self.regs, self.mem = cpus, k

    def cpus(self) -> list[CpuState]:
        return [CpuState(i, r.rip, 0, r.cr0, 0, r.cr4, r.efer, 0, r.cs, 0, 0, 0, 0)
                for i, r in enumerate(self.regs)]  # fmt: skip


@pytest.fixture(autouse=True)
def no_task_reader(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(integ, "TaskReader", lambda _k: None)


def checker(k: Kernel, t: Target, objects: list[str], events: list[Event]) -> integ.Checker:
    reqs = [IsolationRequest(vm="unit", object=o, action="restore") for o in objects]
    ck = integ.Checker(t, k, reqs, events.append, engine="exit")  # type: ignore[arg-type]
    ck.reference()
    return ck


def test_the_probe_reads_and_writes_and_leaves_no_trace() -> None:
    k = Kernel()
    stub = Stub(k, [regs(rax=7, rcx=9)])
    before, pad = dataclasses.replace(stub.cpus[0]), k.read(PAD_FN - 2, 2)
    p = MsrProbe(k)  # type: ignore[arg-type]
    assert p.pad == PAD_FN - 2
    got = p.read(stub, 0)  # type: ignore[arg-type]
    assert got["lstar"] == ENTRY and got["star"] == 0x10 + MSRS["star"]
    p.write(stub, 0, "lstar", 0xFFFF_FFFF_C000_1234)  # type: ignore[arg-type]
    assert stub.msrs[0][MSRS["lstar"]] == 0xFFFF_FFFF_C000_1234
    assert stub.cpus[0] == before and k.read(PAD_FN - 2, 2) == pad


def test_the_probe_skips_user_mode_and_halted_vcpus() -> None:
    k = Kernel()
    k.put(TEXT + 0x20, b"\xfb\xf4")  # sti; hlt: rip after it is an idle vCPU
    stub = Stub(k, [regs(cs=0x33), regs(rip=TEXT + 0x22), regs()])
    stub.halted.add(2)  # halted, though rip does not show it: the step times out
    p = MsrProbe(k)  # type: ignore[arg-type]
    for cpu, why in ((0, "user mode"), (1, "halted"), (2, "did not step")):
        with pytest.raises(ProbeSkipped, match=why):
            p.read(stub, cpu)  # type: ignore[arg-type]
    assert k.read(PAD_FN - 2, 2) == b"\xcc\xcc"


def test_a_stop_check_restores_wp_lstar_and_a_table_entry_once_per_gap() -> None:
    k = Kernel()
    cpus = [regs(), regs()]
    t = Target(cpus, k)
    events: list[Event] = []
    ck = checker(k, t, ["cpu.control", "cpu.msr", "kernel.syscall_table"], events)
    stub = Stub(k, cpus)
    ck.at_stop(stub, stub.cpus[1], 1)  # type: ignore[arg-type]
    assert events == [] and ck.msr_ref[1]["lstar"] == ENTRY
    # A rootkit: WP cleared on vCPU 1, its LSTAR redirected, an entry hooked.
    stub.cpus[1].cr0 &= ~CR0_WP
    stub.msrs[1][MSRS["lstar"]] = 0xFFFF_FFFF_C000_0000
    k.put(TABLE + 8, (TEXT + 0x999).to_bytes(8, "little"))
    ck.at_stop(stub, stub.cpus[1], 1)  # type: ignore[arg-type]
    assert events == []  # within the gap: nothing looked at
    ck._last_stop = 0.0
    ck.at_stop(stub, stub.cpus[1], 1)  # type: ignore[arg-type]
    by = {e.object: e.fields for e in events}
    assert set(by) == {"cpu.control", "cpu.msr", "kernel.syscall_table"}
    assert by["cpu.control"]["bit"] == "WP" and by["cpu.control"]["cpu"] == 1
    assert ("cr0", 1, stub.cpus[1].cr0) in stub.writes and stub.cpus[1].cr0 & CR0_WP
    assert by["cpu.msr"]["where"] == "cpu 1 LSTAR" and by["cpu.msr"]["old_symbol"] == (
        "entry_SYSCALL_64"
    )
    assert by["cpu.msr"]["response"] == "restored" and stub.msrs[1][MSRS["lstar"]] == ENTRY
    assert by["kernel.syscall_table"]["where"] == "sys_call_table[1]"
    assert k.u64(TABLE + 8) == TEXT + 0x410
    assert stub.sel == 2  # the stopped vCPU is selected again, as the engine left it
    assert ck.stats.stop_checks == 2


def test_a_full_tick_probes_every_vcpu_that_can_be_probed() -> None:
    k = Kernel()
    k.put(TEXT + 0x20, b"\xf4")
    cpus = [regs(rip=TEXT + 0x21), regs()]  # vCPU 0 halted
    events: list[Event] = []
    ck = checker(k, Target(cpus, k), ["cpu.msr"], events)
    stub = Stub(k, cpus)
    stub.msrs[1][MSRS["cstar"]] = 0x1234

    def quiesce(fn: Any) -> None:
        fn(stub)

    ck.tick(quiesce, force=True)  # reference for vCPU 1 (CSTAR as found)
    assert events == [] and 0 not in ck.msr_ref
    stub.msrs[1][MSRS["cstar"]] = 0x5678
    ck.tick(quiesce, force=True)
    assert [e.fields["where"] for e in events] == ["cpu 1 CSTAR"]
    assert stub.msrs[1][MSRS["cstar"]] == 0x1234


@given(st.binary(min_size=0, max_size=8), st.integers(0, 3))
def test_odd_bytes_before_rip_never_make_the_probe_step_blindly(before: bytes, cs: int) -> None:
    k = Kernel()
    k.put(TEXT + 0x30 - len(before), before)
    stub = Stub(k, [regs(rip=TEXT + 0x30, cs=cs)])
    p = MsrProbe(k)  # type: ignore[arg-type]
    try:
        p.read(stub, 0, ("lstar",))  # type: ignore[arg-type]
    except ProbeSkipped:
        assert cs & 3 or before.endswith((b"\xf4", b"\x0f\x01\xc9"))
    assert k.read(PAD_FN - 2, 2) == b"\xcc\xcc" and stub.cpus[0].rip == TEXT + 0x30


def _tree(mem: dict[int, int], node: int, left: int, right: int) -> None:
    mem[node + 16], mem[node + 8] = left, right


def test_an_rbtree_walk_finds_every_node_and_ends_on_a_cycle() -> None:
    from vmshield.guest import kintegrity as ki

    mem: dict[int, int] = {}
    a, b, c, d = 0x1000, 0x2000, 0x3000, 0x4000
    _tree(mem, a, b, c)
    _tree(mem, b, 0, d)
    _tree(mem, c, 0, 0)
    _tree(mem, d, 0, 0)

    def read(va: int) -> int:
        if va not in mem:
            raise VmshieldError(f"unreadable {va:#x}")
        return mem[va]

    nodes, broken = ki.walk_rbtree(read, a)
    assert sorted(nodes) == [a, b, c, d] and broken is None
    _tree(mem, d, a, 0)  # forged: back to the top
    nodes, broken = ki.walk_rbtree(read, a)
    assert broken is not None and "twice" in broken
    _tree(mem, d, 0x9000, 0)  # a link to nowhere
    assert "unreadable" in (ki.walk_rbtree(read, a)[1] or "")
    assert ki.walk_rbtree(read, 0) == ([], None)


@given(
    st.dictionaries(
        st.integers(0, 64).map(lambda i: i * 8),
        st.integers(0, 64).map(lambda i: i * 8),
        max_size=64,
    ),
    st.integers(0, 64).map(lambda i: i * 8),
)
def test_an_rbtree_walk_over_any_memory_ends(mem: dict[int, int], top: int) -> None:
    from vmshield.guest import kintegrity as ki

    def read(va: int) -> int:
        if va not in mem:
            raise VmshieldError("unreadable")
        return mem[va]

    nodes, _broken = ki.walk_rbtree(read, top, max_nodes=100)
    assert len(nodes) <= 100 and len(set(nodes)) == len(nodes)


def test_executable_pages_no_owner_claims_come_in_runs() -> None:
    from vmshield.guest import kintegrity as ki

    base = 0xFFFF_FFFF_C000_0000
    pages = [base + i * ki.PAGE for i in (0, 1, 2, 5, 6, 9)]
    owners = [(base + 0x10, base + 0x20), (base + ki.PAGE * 5 + 7, base + ki.PAGE * 5 + 9),
              (base + ki.PAGE * 5, base + ki.PAGE * 7)]  # fmt: skip
    assert ki.unowned_runs(pages, owners) == [(base + ki.PAGE, 2), (base + 9 * ki.PAGE, 1)]
    assert ki.unowned_runs(pages, []) == [
        (base, 3),
        (base + 5 * ki.PAGE, 2),
        (base + 9 * ki.PAGE, 1),
    ]
    assert ki.is_filler(b"\xcc" * ki.PAGE) and ki.is_filler(bytes(ki.PAGE))
    assert not ki.is_filler(b"\xcc" * 100 + b"\xc3" + b"\xcc" * 100) and not ki.is_filler(b"")


@given(st.lists(st.integers(0, 64), max_size=40), st.lists(st.tuples(st.integers(0, 1 << 18),
       st.integers(0, 1 << 18)), max_size=10))  # fmt: skip
def test_unowned_pages_are_exactly_those_no_range_touches(
    idx: list[int], owners: list[tuple[int, int]]
) -> None:
    from vmshield.guest import kintegrity as ki

    pages = [i * ki.PAGE for i in idx]
    got = {va + j * ki.PAGE for va, n in ki.unowned_runs(pages, owners) for j in range(n)}
    want = {p for p in pages if not any(s < e and s < p + ki.PAGE and p < e for s, e in owners)}
    assert got == want
