"""Reading and writing a vCPU's MSRs from the host: one ``rdmsr``/``wrmsr`` stepped on it.

Why a probe: QEMU shows no MSR (LSTAR, CSTAR, STAR, SYSENTER_*) through QMP's
``info registers`` or the gdbstub's x86 register set (it stops at ``efer``), yet these
are what a rootkit redirects first. The probe needs no agent in the guest, so both
engines share it: with every vCPU stopped, two bytes of padding that no code reaches
(the ``int3``/``nop`` run before a function) become ``rdmsr`` or ``wrmsr``, the chosen
vCPU is pointed at them with ``rcx`` (and ``rdx:rax``) loaded, stepped alone
(``vCont;s``: the others stay stopped; QEMU masks interrupts while stepping), and its
registers and the two bytes are put back. The guest sees nothing but time.

A vCPU can only be probed in ring 0 and while it is not halted: a halted vCPU (rip
just past a ``hlt``; an idle guest's vCPUs mostly are) would not execute the step, and
in ring 3 the instruction faults. Such a vCPU is skipped (:class:`ProbeSkipped`) and
tried again at the next check.
"""

from __future__ import annotations

import dataclasses

from vmshield.errors import HypervisorError, VmshieldError
from vmshield.guest.kernel import Kernel
from vmshield.hv.gdbpackets import GdbTimeout, X86Registers
from vmshield.hv.gdbstub import GdbStub
from vmshield.space.borrow import RETURN_PAD_CANDIDATES

MSRS: dict[str, int] = {
    "star": 0xC000_0081,
    "lstar": 0xC000_0082,
    "cstar": 0xC000_0083,
    "sysenter_cs": 0x174,
    "sysenter_esp": 0x175,
    "sysenter_eip": 0x176,
}
"""What an attacker redirects: the system call entries (64-bit, compat, SYSENTER) and
the segments and stack they enter with."""
RDMSR, WRMSR = b"\x0f\x32", b"\x0f\x30"
PAD_CANDIDATES = ("kernel_halt", "machine_halt", "emergency_restart", "__x64_sys_sysinfo",
                  "__x64_sys_uname")  # fmt: skip
"""Functions whose preceding padding may hold the probe. Never one whose padding the
borrowed call's return breakpoint may use (:data:`~vmshield.space.borrow.RETURN_PAD_CANDIDATES`):
:func:`find_pad` skips those, so the two never meet."""
PADDING = (0xCC, 0x90)
MAX_SCAN = 1 << 18  # symbols looked at for padding
STEP_TIMEOUT = 1.0
HALT_TAILS = (b"\xf4", b"\x0f\x01\xc9")  # hlt, mwait: rip right after one = halted


class ProbeSkipped(VmshieldError):
    """This vCPU cannot be probed now (user mode, halted): try again later."""


def find_pad(k: Kernel) -> int:
    """Two padding bytes right before a function: first before one of
    :data:`PAD_CANDIDATES`, else the first ``int3 int3`` found before any function of
    the core text (assembly functions are padded with ``int3``, which nothing runs)."""
    taken = {k.symbols.address(n) for n in RETURN_PAD_CANDIDATES if n in k.symbols}
    for name in PAD_CANDIDATES:
        if name in k.symbols and k.symbols.address(name) not in taken:
            at = k.symbols.address(name) - 2
            if all(b in PADDING for b in k.read(at, 2)):
                return at
    lo, hi = k.symbols.address("_stext"), k.symbols.address("_etext")
    for n, sym in enumerate(k.symbols):
        if n > MAX_SCAN:
            break
        if lo + 2 <= sym.address < hi and sym.address not in taken:
            try:
                if k.read(sym.address - 2, 2) == b"\xcc\xcc":
                    return sym.address - 2
            except VmshieldError:
                continue
    raise VmshieldError("no two padding bytes found for the MSR probe")


class MsrProbe:
    """``rdmsr``/``wrmsr`` on one stopped vCPU (see the module docstring)."""

    def __init__(self, k: Kernel) -> None:
        self.k = k
        self.pad = find_pad(k)
        self.steps = 0

    def unusable(self, regs: X86Registers) -> str | None:
        """Why this vCPU cannot be probed now, or None."""
        if regs.cs & 3:
            return "in user mode"
        try:
            before = self.k.read(regs.rip - 3, 3)
        except VmshieldError:
            return "rip unreadable"
        if any(before.endswith(t) for t in HALT_TAILS):
            return "halted"
        return None

    def read(self, stub: GdbStub, cpu: int, names: tuple[str, ...] = tuple(MSRS)) -> dict[str, int]:
        """The named MSRs of vCPU ``cpu`` (every vCPU stopped)."""
        loads = [{"rcx": MSRS[n]} for n in names]
        out = self._run(stub, cpu, RDMSR, loads)
        return {n: (r.rdx & 0xFFFF_FFFF) << 32 | (r.rax & 0xFFFF_FFFF)
                for n, r in zip(names, out, strict=True)}  # fmt: skip

    def write(self, stub: GdbStub, cpu: int, name: str, value: int) -> None:
        """Write MSR ``name`` of vCPU ``cpu`` (every vCPU stopped)."""
        load = {"rcx": MSRS[name], "rax": value & 0xFFFF_FFFF, "rdx": value >> 32}
        self._run(stub, cpu, WRMSR, [load])

    def _run(self, stub: GdbStub, cpu: int, code: bytes, loads: list[dict[str, int]]
             ) -> list[X86Registers]:  # fmt: skip
        tid = cpu + 1  # QEMU: thread id = vCPU index + 1
        stub.select_thread(tid)
        regs = stub.read_registers()
        why = self.unusable(regs)
        if why:
            raise ProbeSkipped(f"vCPU {cpu} {why}")
        saved = self.k.read(self.pad, len(code))
        stub.write_memory(self.pad, code)
        out: list[X86Registers] = []
        try:
            for load in loads:
                # origin=None: the registers are diffed against the vCPU as it is now.
                step = dataclasses.replace(regs, rip=self.pad, origin=None)
                for name, value in load.items():
                    setattr(step, name, value)
                # A step that does not end right after the instruction is tried once
                # more from the same registers: seen once in a full-suite run (6.1, the
                # space's loop busy), an event taken in the step rather than a fault of
                # the instruction, which a second step does not meet; a real fault
                # (#GP) repeats and is reported.
                for attempt in (1, 2):
                    stub.write_registers(step)
                    try:
                        stub.step_thread(tid, STEP_TIMEOUT)
                    except GdbTimeout:  # halted after all: end the step, skip this vCPU
                        stub.interrupt()
                        stub.wait_stop(5)
                        raise ProbeSkipped(f"vCPU {cpu} did not step (halted)") from None
                    self.steps += 1
                    after = stub.read_registers()
                    if after.rip == self.pad + len(code):
                        break
                    if attempt == 2:
                        raise HypervisorError(f"MSR probe on vCPU {cpu}: {code.hex()} "
                                              f"faulted (rip {after.rip:#x})")  # fmt: skip
                out.append(after)
        finally:
            stub.select_thread(tid)
            stub.write_registers(dataclasses.replace(regs, origin=None))
            stub.write_memory(self.pad, saved)
        return out
