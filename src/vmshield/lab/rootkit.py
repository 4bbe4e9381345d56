"""Rootkit techniques run on command in a lab guest: what a kernel rootkit changes first,
done the way one does it (a kernel module writing with ``CR0.WP`` cleared).

Each technique is computed on the host from the guest kernel's own symbols and memory
(:class:`~vmshield.guest.kernel.Kernel`), then carried out by one or two generated tamper
modules (:mod:`vmshield.lab.tampermod`). Every technique is chosen so that the guest
keeps running: the hooked system call is redirected to a harmless one, the patched
function is one a healthy lab guest never runs, the changed IDT gate is one nothing
raises, the module hidden is a real module loaded for the purpose, and LSTAR is pointed
at a trampoline that jumps on to the real system call entry.

This writes guest kernel memory on purpose. It is a lab tool for tests and benchmarks;
nothing in the monitor uses it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from vmshield.guest.kernel import Kernel
from vmshield.guest.modules import modules

NR_GETPID, NR_GETPPID = 39, 110
MSR_LSTAR = 0xC000_0082
NEVER_RUN = ("sysrq_handle_crash", "emergency_restart", "kernel_halt", "machine_halt")
"""Functions a healthy lab guest never runs (see tests/integration/test_tampermod.py)."""
UNUSED_VECTOR = 0x80
"""``int 0x80`` (32-bit system calls): nothing in the 64-bit busybox lab guest raises it."""

DETECTED_BY = {
    "hook": "kernel.syscall_table",
    "patch": "kernel.text",
    "idt": "kernel.idt",
    "wp": "cpu.control",
    "rodata": "kernel.rodata",
    "lstar": "cpu.msr",
    "hide": "kernel.modules",
}
"""Each technique, by its short name, and the isolation object that must report it (the
test and the bench run the same set)."""


@dataclass(frozen=True)
class Write:
    """One tamper module: ``data`` at ``address`` (``keep_wp_clear``: leave WP off)."""

    address: int
    data: bytes
    keep_wp_clear: bool = False
    unlink: bool = False  # address is a list_head to take off its list at run time
    msr: int = 0  # nonzero: write ``address`` into this MSR (``data`` is empty)


def hook_syscall(k: Kernel, nr: int = NR_GETPID, to: int = NR_GETPPID) -> Write:
    """``sys_call_table[nr]`` pointed at another system call's handler."""
    table = k.symbols.address("sys_call_table")
    return Write(table + 8 * nr, k.read(table + 8 * to, 8))


def patch_function(k: Kernel) -> tuple[Write, str]:
    """A ``jmp rel32`` over the first bytes of a function that never runs."""
    name = next(n for n in NEVER_RUN if n in k.symbols)
    at = k.symbols.address(name)
    dest = k.symbols.address("panic")
    return Write(at, b"\xe9" + struct.pack("<i", dest - (at + 5))), name


def change_idt(k: Kernel, vector: int = UNUSED_VECTOR) -> Write:
    """IDT gate ``vector`` pointed at the handler of gate 0 (a handler swap)."""
    idt = k.symbols.address("idt_table")
    gate0, gate = k.read(idt, 16), k.read(idt + 16 * vector, 16)
    forged = gate0[0:2] + gate[2:6] + gate0[6:12] + gate[12:16]
    return Write(idt + 16 * vector, forged)


def clear_wp(k: Kernel) -> Write:
    """Clear ``CR0.WP`` on the vCPU running ``insmod`` and leave it clear. The bytes
    written are the ones already there (a harmless store through the cleared WP)."""
    at = k.symbols.address("sys_call_table")
    return Write(at, k.read(at, 8), keep_wp_clear=True)


def hide_module(k: Kernel, name: str) -> Write:
    """Take module ``name`` off the ``modules`` list (``list_del_init`` by hand, the
    neighbours read in the guest at run time: the tamper module is itself on the list
    while it runs). Its sysfs kobject stays, as with most rootkits that hide from
    ``lsmod``."""
    off = k.member_offset("module", "list")
    mod = next(m for m in modules(k) if m.name == name)
    return Write(mod.address + off, b"\0", unlink=True)


def lstar_trampoline(k: Kernel) -> bytes:
    """Code for a redirected LSTAR that keeps every system call working: ``jmp
    *0(%rip)`` to ``entry_SYSCALL_64``. Nothing else may run there: the CPU arrives
    with the user's stack and GS, so the code touches neither (only its own bytes,
    mapped wherever kernel text is). Position-independent: it runs from a resident lab
    module's text (:func:`vmshield.lab.tampermod.build_resident_module`)."""
    return b"\xff\x25\0\0\0\0" + struct.pack("<Q", k.symbols.address("entry_SYSCALL_64"))


def redirect_lstar(trampoline: int) -> Write:
    """LSTAR (on the vCPU that runs ``insmod``) pointed at ``trampoline``."""
    return Write(trampoline, b"", msr=MSR_LSTAR)


def patch_rodata(k: Kernel) -> Write:
    """One byte of read-only data changed: the first letter of ``linux_banner`` (what a
    rootkit does to a constant table; this one only shows in a log line)."""
    at = k.symbols.address("linux_banner")
    lo, hi = k.symbols.address("__start_rodata"), k.symbols.address("__end_rodata")
    if not lo <= at < hi:
        raise ValueError(f"linux_banner {at:#x} is not in rodata {lo:#x}..{hi:#x}")
    first = k.read(at, 1)
    return Write(at, first.swapcase() if first.isalpha() else b"?")
