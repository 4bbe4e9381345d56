"""User-space monitoring points: ``ufunc:PATH:OFFSET`` (a file offset in an executable).

The point's virtual address comes from a process that runs PATH now: its ELF program
headers are read from its own memory (``AT_PHDR``/``AT_PHNUM`` in ``mm->saved_auxv``
give where the loader put them, which also gives the load bias of a PIE), and the
PT_LOAD segment holding OFFSET maps it to an address. A gdbstub breakpoint matches a
virtual address in every address space, so each hit is checked against the current
process's executable (``mm->exe_file``) and other programs that happen to run code at
that address are ignored. There is no ftrace NOP in user code: a hit is resumed by
stepping over the instruction (the gdbstub client does that on continue).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from vmshield.errors import GuestFormatError, VmshieldError
from vmshield.guest.files import exe_path
from vmshield.guest.kernel import Kernel
from vmshield.guest.paging import PageWalker
from vmshield.guest.tasks import TaskReader
from vmshield.monitor.context import HitContext

AT_PHDR, AT_PHNUM = 3, 5
PT_LOAD, PT_PHDR = 1, 6
ET_EXEC, ET_DYN = 2, 3
MAX_AUXV = 64
MAX_PHNUM = 128


@dataclass(frozen=True)
class UserPoint:
    path: str
    offset: int
    address: int
    pie: bool
    pid: int  # the process the address was computed in


def _user_walker(k: Kernel, mm: int) -> PageWalker:
    pgd = k.u64(mm + k.member_offset("mm_struct", "pgd"))
    return PageWalker(k.walker.read_phys, k.walker.translate(pgd), len(k.walker.levels) == 5)


def locate(k: Kernel, path: str, offset: int) -> UserPoint:
    """Where ``offset`` of the executable ``path`` is mapped, from a process running it."""
    tr = TaskReader(k)
    for task in tr.walk():
        try:
            if exe_path(k, task) != path:
                continue
        except VmshieldError:
            continue
        mm = k.u64(task + k.member_offset("task_struct", "mm"))
        w = _user_walker(k, mm)
        auxv_at = mm + k.member_offset("mm_struct", "saved_auxv")
        aux = struct.unpack(f"<{MAX_AUXV}Q", k.read(auxv_at, 8 * MAX_AUXV))
        vals = {aux[i]: aux[i + 1] for i in range(0, MAX_AUXV - 1, 2) if aux[i]}
        phdr, phnum = vals.get(AT_PHDR), vals.get(AT_PHNUM)
        if not phdr or not phnum or phnum > MAX_PHNUM:
            raise GuestFormatError(f"{path}: no usable AT_PHDR/AT_PHNUM in its auxv")
        raw = w.read(phdr, 56 * phnum)
        phs = [struct.unpack_from("<IIQQQQQQ", raw, 56 * i) for i in range(phnum)]
        loads = [p for p in phs if p[0] == PT_LOAD]
        # Load bias: AT_PHDR is where file offset e_phoff landed.
        self_ph = next((p for p in phs if p[0] == PT_PHDR), None)
        if self_ph is not None:
            bias = phdr - self_ph[3]
        else:
            first = min(loads, key=lambda p: p[3])
            bias = phdr - (first[3] + 64 - first[2])  # e_phoff is 64 in ELF64 executables
        for _t, flags, p_off, p_va, _pa, filesz, _m, _a in loads:
            if p_off <= offset < p_off + filesz:
                if not flags & 1:
                    raise VmshieldError(f"{path}: offset {offset:#x} is not in executable code")
                pid = k.s32(task + k.member_offset("task_struct", "tgid"))
                return UserPoint(path, offset, bias + p_va + offset - p_off, bias != 0, pid)
        raise VmshieldError(f"{path}: offset {offset:#x} is in no loaded segment")
    raise VmshieldError(f"no process runs {path} now (start it, then arm the ufunc point)")


def decode(c: HitContext, point: UserPoint) -> dict[str, Any] | None:
    """The event fields, or None when the process at this address is another program."""
    if exe_path(c.kernel, c.current) != point.path:
        return None
    return {
        "path": point.path,
        "offset": point.offset,
        "address": f"{point.address:#x}",
        "args": [f"{c.arg(i):#x}" for i in range(6)],
    }
