"""GdbStub against a real QEMU (x86_64, TCG, firmware only: no kernel, no disk).

Every test starts its own QEMU (``-S``: the vCPU sits at the reset vector) with a
gdbstub and a QMP socket, and cross-checks what the gdbstub says with QMP's
``info registers`` / ``xp``. Long mode is entered without any guest code: a GDT and
identity page tables are written through the gdbstub and CR3/CR4/EFER/CR0/CS are set
with ``P`` packets (QEMU loads the CS descriptor from the GDT on a selector write).

If qemu-system-x86_64 is missing these tests fail; they are never skipped.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from vmshield.hv.gdbpackets import X86_64_G_SIZE, X86_64_REGISTERS
from vmshield.hv.gdbstub import (
    SIGINT,
    SIGTRAP,
    GdbErrorReply,
    GdbStateError,
    GdbStub,
    GdbTimeout,
)

QEMU = "qemu-system-x86_64"

# ------------------------------------------------------------------ QEMU + QMP plumbing


class Qmp:
    """Just enough QMP (raw JSON lines) to cross-check the gdbstub."""

    def __init__(self, path: Path, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(10)
            try:
                self.sock.connect(str(path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                # QEMU binds (the file appears) a moment before it listens.
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        self.file = self.sock.makefile("rwb")
        greeting = json.loads(self.file.readline())
        assert "QMP" in greeting
        self.execute("qmp_capabilities")

    def execute(self, command: str, **arguments: Any) -> Any:
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self.file.write(json.dumps(msg).encode() + b"\n")
        self.file.flush()
        while True:
            line = self.file.readline()
            assert line, "QMP connection closed"
            reply = json.loads(line)
            if "event" in reply:
                continue
            assert "error" not in reply, reply
            return reply["return"]

    def hmp(self, command_line: str) -> str:
        out: str = self.execute("human-monitor-command", **{"command-line": command_line})
        return out

    def status(self) -> str:
        status: str = self.execute("query-status")["status"]
        return status

    def registers(self, cpu_all: bool = False) -> dict[str, int]:
        return parse_info_registers(self.hmp("info registers" + (" -a" if cpu_all else "")))

    def phys(self, addr: int, size: int) -> bytes:
        text = self.hmp(f"xp /{size}xb {addr:#x}")
        return bytes(int(b, 16) for b in re.findall(r"0x([0-9a-f]{2})\b", text.split(":", 1)[1]))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()
            self.sock.close()


_PAIR = re.compile(r"\b([A-Z][A-Z0-9]*) ?=([0-9a-f]{4,16})\b")
_SEG = re.compile(r"^(ES|CS|SS|DS|FS|GS) =([0-9a-f]{4}) ([0-9a-f]+) ", re.MULTILINE)
_XMM = re.compile(r"XMM(\d\d)=([0-9a-f]{16}) ([0-9a-f]{16})")
_FPR = re.compile(r"FPR(\d)=([0-9a-f]{16}) ([0-9a-f]{4})")
_NAMES = {
    **{f"{p}{n}": f"r{n.lower()}" for p in "ER" for n in ("AX", "BX", "CX", "DX", "SI", "DI")},
    **{f"{p}{n}": f"r{n.lower()}" for p in "ER" for n in ("BP", "SP")},
    **{f"R{i}": f"r{i}" for i in range(8, 16)},
    "EIP": "rip",
    "RIP": "rip",
    "EFL": "eflags",
    "RFL": "eflags",
    "CR0": "cr0",
    "CR2": "cr2",
    "CR3": "cr3",
    "CR4": "cr4",
    "EFER": "efer",
    "FCW": "fctrl",
    "MXCSR": "mxcsr",
}


def parse_info_registers(text: str) -> dict[str, int]:
    """HMP ``info registers`` (one CPU) -> gdb register names (plus ``*_base``)."""
    out: dict[str, int] = {}
    for key, value in _PAIR.findall(text):
        if key in _NAMES:
            out[_NAMES[key]] = int(value, 16)
    for seg, selector, base in _SEG.findall(text):
        out[seg.lower()] = int(selector, 16)
        out[f"{seg.lower()}_base"] = int(base, 16)
    for n, high, low in _XMM.findall(text):
        out[f"xmm{int(n)}"] = int(high + low, 16)
    for n, mantissa, exponent in _FPR.findall(text):  # physical x87 registers (TOP=0: st<n>)
        out[f"st{n}"] = int(exponent + mantissa, 16)
    return out


@dataclass
class Vm:
    gdb_path: Path
    qmp: Qmp
    proc: subprocess.Popen[bytes]

    def stub(self, timeout: float = 10.0) -> GdbStub:
        gdb = GdbStub(request_timeout=10)
        gdb.connect(self.gdb_path, timeout=timeout)
        return gdb


@pytest.fixture
def start_vm(tmp_path: Path) -> Iterator[Callable[..., Vm]]:
    qemu = shutil.which(QEMU)
    if qemu is None:
        pytest.fail(
            f"{QEMU} is not installed (apt-get install qemu-system-x86): these tests need it"
        )
    started: list[Vm] = []

    def start(*extra: str, paused: bool = True) -> Vm:
        n = len(started)
        gdb_path = tmp_path / f"gdb{n}.sock"
        qmp_path = tmp_path / f"qmp{n}.sock"
        log = (tmp_path / f"qemu{n}.log").open("wb")
        args = [
            qemu, "-machine", "q35", "-accel", "tcg", "-cpu", "max", "-m", "64",
            "-display", "none", "-nic", "none", "-nodefaults", "-no-user-config",
            *(["-S"] if paused else []), *extra,
            "-chardev", f"socket,id=gdb0,path={gdb_path},server=on,wait=off",
            "-gdb", "chardev:gdb0",
            "-qmp", f"unix:{qmp_path},server=on,wait=off",
        ]  # fmt: skip
        proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        log.close()
        vm_ok = False
        try:
            deadline = time.monotonic() + 20
            while not (gdb_path.exists() and qmp_path.exists()):
                if proc.poll() is not None:
                    pytest.fail(f"QEMU exited: {(tmp_path / f'qemu{n}.log').read_text()}")
                if time.monotonic() > deadline:
                    pytest.fail("QEMU did not create its sockets within 20 s")
                time.sleep(0.02)
            # Once QMP greets, QEMU's setup is over: the gdbstub socket listens too.
            vm = Vm(gdb_path, Qmp(qmp_path), proc)
            vm_ok = True
        finally:
            if not vm_ok:
                _kill(proc)
        started.append(vm)
        return vm

    try:
        yield start
    finally:
        for vm in started:
            vm.qmp.close()
            _kill(vm.proc)


def _kill(proc: subprocess.Popen[bytes]) -> None:
    """Stop the QEMU we started: its own process group, by its pid."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)


# ------------------------------------------------------------------ guest setup helpers

CODE = 0x7000
DATA = 0x6000
# 16-bit: inc ax; nop; jmp 0x7000
LOOP16 = bytes.fromhex("4090ebfc")
# 16-bit: inc ax; mov [0x6000],ax; mov bx,[0x6002]; jmp 0x7000
WATCH16 = bytes.fromhex("40a300608b1e0260ebf6")
# 64-bit: inc rax; nop; jmp back to the inc
LOOP64 = bytes.fromhex("48ffc090ebfa")
HIGH_ALIAS = 0xFFFF_8000_0000_0000  # PML4 slot 256 maps the same first 64 MiB


def run_real_mode_code(gdb: GdbStub, code: bytes) -> None:
    """Put ``code`` at 0:0x7000 and point the reset vCPU at it (CS base becomes 0)."""
    gdb.write_memory(CODE, code)
    gdb.write_register("cs", 0)
    gdb.write_register("rip", CODE)


def enter_long_mode(gdb: GdbStub) -> None:
    """GDT at 0 (GDTR base after reset), 2 MiB identity pages for 64 MiB, CS64."""
    gdt = struct.pack("<3Q", 0, 0x00AF9B000000FFFF, 0x00CF93000000FFFF)
    gdb.write_memory(0, gdt)
    pml4 = bytearray(4096)
    pml4[0:8] = struct.pack("<Q", 0x2003)
    pml4[256 * 8 : 257 * 8] = struct.pack("<Q", 0x2003)
    pdpt = bytearray(4096)
    pdpt[0:8] = struct.pack("<Q", 0x3003)
    pd = b"".join(struct.pack("<Q", i << 21 | 0x83) for i in range(32)) + bytes(4096 - 256)
    gdb.write_memory(0x1000, bytes(pml4) + bytes(pdpt) + pd)
    for name, value in (
        ("cr3", 0x1000),
        ("cr4", 0x20),  # PAE
        ("efer", 0x100),  # LME
        ("cr0", 0x80000011),  # PG | ET | PE: QEMU sets EFER.LMA
        ("cs", 0x08),
        ("ss", 0x10),
        ("ds", 0x10),
        ("es", 0x10),
    ):
        gdb.write_register(name, value)


# ------------------------------------------------------------------ tests


def test_g_layout_matches_qemu_target_description(start_vm: Callable[..., Vm]) -> None:
    vm = start_vm()
    with vm.stub() as gdb:
        target = gdb.read_feature_xml("target.xml")
        assert b"<architecture>i386:x86-64</architecture>" in target
        includes = re.findall(rb'<xi:include href="([^"]+)"', target)
        assert includes, target
        regs: list[tuple[str, int]] = []
        for inc in includes:
            doc = gdb.read_feature_xml(inc.decode())  # several qXfer chunks (~8 KiB)
            assert len(doc) > 4096
            root = ET.fromstring(doc.decode())
            regs += [(r.attrib["name"], int(r.attrib["bitsize"]) // 8) for r in root.iter("reg")]
        assert regs == [(r.name, r.size) for r in X86_64_REGISTERS]
        assert sum(size for _, size in regs) == X86_64_G_SIZE
        g = gdb.request(b"g")
        assert len(g) == 2 * X86_64_G_SIZE
        # there is no register 66
        with pytest.raises(GdbErrorReply):
            gdb.request(b"p42")


def test_reset_state_matches_qmp(start_vm: Callable[..., Vm]) -> None:
    vm = start_vm()
    with vm.stub() as gdb:
        assert gdb.initial_stop is None  # -S: nothing was running, no T02
        assert gdb.stop_reply is not None and gdb.stop_reply.signal == SIGTRAP
        regs = gdb.read_registers()
        assert regs.rip == 0xFFF0
        assert regs.cs == 0xF000
        assert regs.eflags == 0x2
        assert regs.cr0 == 0x60000010
        assert regs.efer == 0
        assert regs.value("fctrl") == 0x37F and regs.mxcsr == 0x1F80
        qmp = vm.qmp.registers()
        for name in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "rip", "eflags"):
            assert getattr(regs, name) == qmp[name], name
        for name in ("cs", "ss", "ds", "es", "fs", "gs", "fs_base", "gs_base"):
            assert getattr(regs, name) == qmp[name], name
        for name in ("cr0", "cr2", "cr3", "cr4", "efer"):
            assert getattr(regs, name) == qmp[name], name
        assert gdb.read_register("rip") == 0xFFF0
        assert gdb.read_register("cs") == 0xF000
        assert gdb.threads() == [1]
        assert gdb.current_thread() == 1
        assert "paused" in gdb.query_monitor("info status")


def test_connect_to_running_vm_consumes_initial_stop(start_vm: Callable[..., Vm]) -> None:
    vm = start_vm(paused=False)
    assert vm.qmp.status() == "running"
    with vm.stub() as gdb:
        assert gdb.initial_stop is not None
        assert gdb.initial_stop.signal == SIGINT and gdb.initial_stop.thread is not None
        assert vm.qmp.status() == "paused"
        gdb.read_registers()
        gdb.detach()
    assert vm.qmp.status() == "running"


def test_memory_round_trip(start_vm: Callable[..., Vm]) -> None:
    vm = start_vm()
    rng = random.Random(1234)
    data = rng.randbytes(9000)  # several chunks, three page edges
    with vm.stub() as gdb:
        gdb.write_memory(0x10123, data)
        assert gdb.read_memory(0x10123, len(data)) == data
        assert vm.qmp.phys(0x10123, 64) == data[:64]
        assert vm.qmp.phys(0x10123 + 8000, 32) == data[8000:8032]
        gdb.write_memory(0x10125, b"\x24\x23\x7d\x2a")  # bytes that need escaping in X
        assert gdb.read_memory(0x10120, 10) == b"\x00\x00\x00" + data[:2] + b"$#}*" + data[6:7]
        assert gdb.read_memory(0x10000, 0) == b""
        with pytest.raises(GdbErrorReply) as info:
            gdb.read_memory(0x1_0000_0000, 16)  # nothing there (64 MiB of RAM)
        assert info.value.code == 0x14 and "EFAULT" in str(info.value)
        with pytest.raises(GdbErrorReply, match="at 0x4000000: E14"):
            gdb.read_memory(0x3FFF000, 0x2000)  # the last RAM page, then the error names the hole


def test_register_writes_real_mode(start_vm: Callable[..., Vm]) -> None:
    vm = start_vm()
    with vm.stub() as gdb:
        before = gdb.read_registers()
        gdb.write_register("rax", 0x11223344)
        assert vm.qmp.registers()["rax"] == 0x11223344
        changed = replace(before, rbx=0x55667788, rsi=0x1234, rip=0xFFF3)
        gdb.write_registers(changed)
        after = gdb.read_registers()
        assert (after.rax, after.rbx, after.rsi, after.rip) == (
            0x11223344,
            0x55667788,
            0x1234,
            0xFFF3,
        )
        # Nothing else moved: the P path does not suffer from QEMU's real-mode G bug.
        assert replace(after, rax=0, rbx=0, rsi=0, rip=0) == replace(before, rip=0)
        qmp = vm.qmp.registers()
        assert (qmp["cr0"], qmp["cr4"], qmp["fctrl"], qmp["mxcsr"]) == (
            0x60000010,
            0,
            0x37F,
            0x1F80,
        )
        with pytest.raises(GdbStateError, match="long mode"):
            gdb.write_registers(after, use_g=True)
        # QEMU 7.2 quirk: outside 64-bit mode GPR writes are cut to 32 bits, r8+ ignored.
        gdb.write_register("r8", 0x1234)
        gdb.write_register("rcx", 0x1_0000_0001)
        regs = gdb.read_registers()
        assert (regs.r8, regs.rcx) == (0, 1)


def test_single_step(start_vm: Callable[..., Vm]) -> None:
    vm = start_vm()
    with vm.stub() as gdb:
        run_real_mode_code(gdb, LOOP16)
        assert gdb.read_registers().rip == CODE
        stop = gdb.step()
        assert stop.signal == SIGTRAP and stop.thread is not None
        regs = gdb.read_registers()
        assert regs.rip == CODE + 1 and regs.rax == 1
        gdb.step()
        gdb.step()  # the jmp
        assert gdb.read_registers().rip == CODE
        assert vm.qmp.registers()["rip"] == CODE


def test_breakpoint_continue_interrupt(start_vm: Callable[..., Vm]) -> None:
    vm = start_vm()
    with vm.stub() as gdb:
        run_real_mode_code(gdb, LOOP16)
        gdb.insert_breakpoint(CODE + 1)
        gdb.cont()
        assert gdb.running
        stop = gdb.wait_stop(10)
        assert stop.signal == SIGTRAP
        regs = gdb.read_registers()
        assert (regs.rip, regs.rax) == (CODE + 1, 1)
        gdb.cont()  # resuming from the breakpoint address: one more lap, same stop
        gdb.wait_stop(10)
        regs = gdb.read_registers()
        assert (regs.rip, regs.rax) == (CODE + 1, 2)
        for _ in range(2):  # without reading registers in between: cont asks for rip itself
            gdb.cont()
            assert gdb.wait_stop(10).signal == SIGTRAP
        regs = gdb.read_registers()
        assert (regs.rip, regs.rax) == (CODE + 1, 4)
        gdb.remove_breakpoint(CODE + 1)
        with pytest.raises(GdbErrorReply):
            gdb.remove_breakpoint(CODE + 1)  # QEMU: E22 for an unknown breakpoint
        gdb.cont()
        time.sleep(0.2)
        assert vm.qmp.status() == "running"
        with pytest.raises(GdbTimeout):
            gdb.wait_stop(0.2)  # still running: nothing to report
        with pytest.raises(GdbStateError):
            gdb.read_registers()  # would stop the VM and lose the packet: refused
        gdb.interrupt()
        stop = gdb.wait_stop(10)
        assert stop.signal == SIGINT
        regs = gdb.read_registers()
        assert CODE <= regs.rip < CODE + len(LOOP16) and regs.rax > 1000
        assert vm.qmp.status() == "paused"


def test_watchpoints(start_vm: Callable[..., Vm]) -> None:
    vm = start_vm()
    with vm.stub() as gdb:
        run_real_mode_code(gdb, WATCH16)
        cases = (("write", "watch", DATA, CODE + 4), ("read", "rwatch", DATA + 2, CODE + 8))
        for access, kind, addr, rip_after in cases:
            gdb.insert_watchpoint(addr, 2, access)  # type: ignore[arg-type]
            gdb.cont()
            stop = gdb.wait_stop(10)
            assert (stop.signal, stop.watch_kind, stop.watch_addr) == (SIGTRAP, kind, addr)
            assert gdb.read_registers().rip == rip_after  # reported after the access
            gdb.remove_watchpoint(addr, 2, access)  # type: ignore[arg-type]
        gdb.insert_watchpoint(DATA, 2, "access")
        gdb.cont()
        stop = gdb.wait_stop(10)
        assert (stop.watch_kind, stop.watch_addr) == ("awatch", DATA)
        gdb.remove_watchpoint(DATA, 2, "access")
        assert gdb.read_memory(DATA, 2) == gdb.read_registers().rax.to_bytes(2, "little")


def test_step_off_breakpoint_reports_watchpoint(start_vm: Callable[..., Vm]) -> None:
    vm = start_vm()
    with vm.stub() as gdb:
        run_real_mode_code(gdb, WATCH16)
        gdb.insert_breakpoint(CODE + 1)  # the store to DATA
        gdb.insert_watchpoint(DATA, 2, "write")
        gdb.cont()
        stop = gdb.wait_stop(10)
        assert stop.watch_kind is None and gdb.read_registers().rip == CODE + 1
        gdb.cont()  # steps off the breakpoint: the store hits the watchpoint during that step
        stop = gdb.wait_stop(10)
        assert (stop.watch_kind, stop.watch_addr) == ("watch", DATA)
        assert gdb.read_registers().rip == CODE + 4
        assert vm.qmp.status() == "debug"  # QEMU's run state after a gdb breakpoint/watchpoint
        gdb.remove_watchpoint(DATA, 2, "write")
        gdb.cont()  # the next lap stops at the breakpoint again
        gdb.wait_stop(10)
        regs = gdb.read_registers()
        assert (regs.rip, regs.rax) == (CODE + 1, 2)


def test_step_after_watchpoint_executes_one_instruction(start_vm: Callable[..., Vm]) -> None:
    vm = start_vm()
    with vm.stub() as gdb:
        run_real_mode_code(gdb, WATCH16)
        gdb.insert_watchpoint(DATA, 2, "write")
        gdb.cont()
        assert gdb.wait_stop(10).watch_kind == "watch"
        assert gdb.read_registers().rip == CODE + 4
        gdb.step()  # QEMU's first step after a watchpoint stop is empty: GdbStub steps again
        assert gdb.read_registers().rip == CODE + 8
        gdb.step()
        gdb.step()
        stop = gdb.step()  # the store, stepped: a watchpoint stop again
        assert stop.watch_kind == "watch" and gdb.read_registers().rip == CODE + 4
        gdb.step()
        assert gdb.read_registers().rip == CODE + 8
        gdb.remove_watchpoint(DATA, 2, "write")
        gdb.insert_breakpoint(CODE + 1)
        gdb.cont()
        gdb.wait_stop(10)
        regs = gdb.read_registers()
        assert (regs.rip, regs.rax) == (CODE + 1, 3)
        assert vm.qmp.registers()["rax"] == 3


def test_code_patch_is_seen_by_tcg(start_vm: Callable[..., Vm]) -> None:
    vm = start_vm()
    with vm.stub() as gdb:
        run_real_mode_code(gdb, LOOP16)
        gdb.insert_breakpoint(CODE + 1)
        gdb.cont()
        gdb.wait_stop(10)
        gdb.cont()
        gdb.wait_stop(10)
        assert gdb.read_registers().rax == 2  # the loop's block is translated and cached
        gdb.write_memory(CODE, b"\x48")  # inc ax -> dec ax, written through QEMU
        gdb.cont()
        gdb.wait_stop(10)
        assert gdb.read_registers().rax == 1
        # rip moved onto a breakpoint by hand: cont still makes progress
        gdb.write_register("rip", CODE + 1)
        gdb.cont()
        gdb.wait_stop(10)
        regs = gdb.read_registers()
        assert (regs.rip, regs.rax) == (CODE + 1, 0)
        assert vm.qmp.phys(CODE, 4) == b"\x48\x90\xeb\xfc"


def test_long_mode_full_width_registers_and_virtual_memory(start_vm: Callable[..., Vm]) -> None:
    vm = start_vm()
    with vm.stub() as gdb:
        enter_long_mode(gdb)
        info = vm.qmp.hmp("info registers")
        assert "CS64" in info
        regs = gdb.read_registers()
        assert regs.efer == 0x500 and regs.cr3 == 0x1000 and regs.cs == 8
        # Every GPR with a distinct full 64-bit value, through P packets.
        values: dict[str, Any] = {
            r.name: 0x0101_0101_0101_0101 * (i + 1) ^ (1 << 63)
            for i, r in enumerate(X86_64_REGISTERS[:16])
        }
        gdb.write_registers(replace(regs, **values))
        qmp = vm.qmp.registers()
        for name, value in values.items():
            assert qmp[name] == value, name
        regs = gdb.read_registers()
        assert regs.gprs() == values
        # One G with everything: exact in 64-bit mode.
        moved = replace(regs, rbx=0xDEAD_BEEF_0000_0001, r9=7, fs_base=0xFFFF_8880_1234_5000)
        gdb.write_registers(moved, use_g=True)
        back = gdb.read_registers()
        assert back.to_bytes() == moved.to_bytes()
        qmp = vm.qmp.registers()
        assert (qmp["rbx"], qmp["r9"], qmp["fs_base"]) == (
            0xDEAD_BEEF_0000_0001,
            7,
            0xFFFF_8880_1234_5000,
        )
        assert (qmp["cr0"], qmp["cr4"], qmp["efer"], qmp["mxcsr"]) == (
            0x80000011,
            0x20,
            0x500,
            0x1F80,
        )
        # Memory addresses are virtual: the high alias reads the same physical bytes.
        gdb.write_memory(CODE, b"vmshield")
        assert gdb.read_memory(HIGH_ALIAS + CODE, 8) == b"vmshield"
        with pytest.raises(GdbErrorReply):
            gdb.read_memory(0x0000_7FFF_0000_0000, 8)  # not mapped by our page tables
        # Run 64-bit code through the alias; the breakpoint is a virtual address too.
        gdb.write_memory(HIGH_ALIAS + 0x5000, LOOP64)
        gdb.write_register("rip", HIGH_ALIAS + 0x5000)
        gdb.write_register("rax", 41)
        gdb.insert_breakpoint(HIGH_ALIAS + 0x5003)
        gdb.cont()
        assert gdb.wait_stop(10).signal == SIGTRAP
        regs = gdb.read_registers()
        assert (regs.rip, regs.rax) == (HIGH_ALIAS + 0x5003, 42)
        # The x87/SSE tail: P writes at the right register numbers, QMP agrees.
        tail = {
            "xmm3": 0x1122_3344_5566_7788_99AA_BBCC_DDEE_FF00,
            "xmm12": 0x0102_0304_0506_0708_090A_0B0C_0D0E_0F10,
            "st1": 0x4000_C90F_DAA2_2168_C000,  # pi, 80-bit
            "mxcsr": 0x1FA0,
            "fctrl": 0x27F,
        }
        changed = regs
        for name, value in tail.items():
            changed = changed.with_register(name, value)
        gdb.write_registers(changed)
        qmp = vm.qmp.registers()
        for name, value in tail.items():
            assert qmp[name] == value, name
        assert gdb.read_registers().to_bytes() == changed.to_bytes()
        # k_gs_base (not shown by QMP) sits at regno 26 / offset 180, between gs_base and cr0
        gdb.write_register("k_gs_base", 0xFFFF_8880_0000_1000)
        regs = gdb.read_registers()
        assert regs.k_gs_base == 0xFFFF_8880_0000_1000
        assert (regs.gs_base, regs.cr0) == (0, 0x80000011)


def test_vcpu_threads(start_vm: Callable[..., Vm]) -> None:
    vm = start_vm("-smp", "2")
    with vm.stub() as gdb:
        assert gdb.threads() == [1, 2]
        gdb.select_thread(2)
        gdb.write_register("rax", 0xABCD)
        assert gdb.read_registers().rax == 0xABCD
        gdb.select_thread(1)
        assert gdb.read_registers().rax == 0
        cpus = vm.qmp.hmp("info registers -a").split("CPU#")[1:]
        assert [parse_info_registers(c)["rax"] for c in cpus] == [0, 0xABCD]
        with pytest.raises(GdbErrorReply, match="selecting thread 3") as info:
            gdb.select_thread(3)
        assert info.value.code == 0x22


def test_detach_lets_vm_run_and_allows_reconnect(start_vm: Callable[..., Vm]) -> None:
    vm = start_vm()
    gdb = vm.stub()
    run_real_mode_code(gdb, LOOP16)
    gdb.insert_breakpoint(CODE + 1)
    gdb.detach()  # QEMU drops our breakpoints and resumes
    assert not gdb.connected
    time.sleep(0.2)
    assert vm.qmp.status() == "running"
    with vm.stub() as again:
        assert again.initial_stop is not None and again.initial_stop.signal == SIGINT
        assert again.read_registers().rax > 1  # ran through the old breakpoint
        again.detach()
    assert vm.qmp.status() == "running"


def test_second_client_is_not_served(start_vm: Callable[..., Vm]) -> None:
    vm = start_vm()
    with vm.stub():
        other = GdbStub()
        with pytest.raises(GdbTimeout, match="one gdb client at a time"):
            other.connect(vm.gdb_path, timeout=0.5)
        assert not other.connected


def test_register_read_round_trip_time(start_vm: Callable[..., Vm]) -> None:
    vm = start_vm()
    with vm.stub() as gdb:
        for _ in range(50):
            gdb.read_registers()
        samples = []
        for _ in range(1000):
            t = time.perf_counter()
            gdb.read_registers()
            samples.append(time.perf_counter() - t)
        samples.sort()
        median = statistics.median(samples)
        print(
            f"\n'g' round trip over a Unix socket, VM stopped: median {median * 1e6:.0f} us, "
            f"p10 {samples[100] * 1e6:.0f} us, p90 {samples[900] * 1e6:.0f} us"
        )
        assert median < 0.005
