"""User-space monitoring points: ``ufunc:PATH:SYMBOL|OFFSET`` in an executable.

The point's virtual address comes from a process that runs PATH now: its ELF program
headers are read from its own memory (``AT_PHDR``/``AT_PHNUM`` in ``mm->saved_auxv``
give where the loader put them, which also gives the load bias of a PIE), and the
PT_LOAD segment holding OFFSET maps it to an address. A gdbstub breakpoint matches a
virtual address in every address space, so each hit is checked against the current
process's executable (``mm->exe_file``) and other programs that happen to run code at
that address are ignored. There is no ftrace NOP in user code: a hit is resumed by
stepping over the instruction (the gdbstub client does that on continue).

A SYMBOL is looked up in the program's dynamic symbol table (``.dynsym``, found through
PT_DYNAMIC in the process's memory): it survives ``strip``, and holds every global
function of a dynamically linked or ``-static-pie -Wl,-E`` program. A fully static,
stripped program has no symbols anywhere: give the file offset.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, replace
from typing import Any

from vmshield.errors import GuestFormatError, VmshieldError
from vmshield.guest.files import exe_path
from vmshield.guest.kernel import Kernel
from vmshield.guest.mm import mm_walker
from vmshield.guest.paging import PageWalker
from vmshield.guest.tasks import TaskReader
from vmshield.objects.context import PointContext
from vmshield.objects.model import COMMON_FILTERS, NON_DENY, CatalogObject

UFUNC = "ufunc:"
AT_PHDR, AT_PHNUM = 3, 5
PT_LOAD, PT_DYNAMIC, PT_PHDR = 1, 2, 6
DT_NULL, DT_STRTAB, DT_SYMTAB = 0, 5, 6
MAX_DYN = 512
MAX_DYNSYM = 1 << 16
ET_EXEC, ET_DYN = 2, 3
MAX_AUXV = 64
MAX_PHNUM = 128


@dataclass(frozen=True)
class UserPoint:
    path: str
    offset: int
    address: int
    symbol: str | None
    pie: bool
    pid: int  # the process the address was computed in


def _dynsym(w: PageWalker, bias: int, dyn_va: int, name: str) -> int:
    """File virtual address of ``name`` in the dynamic symbol table."""
    raw = w.read(dyn_va, 16 * MAX_DYN)
    tags: dict[int, int] = {}
    for i in range(MAX_DYN):
        tag, val = struct.unpack_from("<qQ", raw, 16 * i)
        if tag == DT_NULL:
            break
        tags.setdefault(tag, val)
    symtab, strtab = tags.get(DT_SYMTAB), tags.get(DT_STRTAB)
    if not symtab or not strtab or strtab <= symtab:
        raise VmshieldError("no dynamic symbol table (give the file offset instead)")
    # The loader may have relocated the entries in place (PIE): unrelocated ones are
    # below the load bias.
    if bias and symtab < bias:
        symtab, strtab = symtab + bias, strtab + bias
    count = min((strtab - symtab) // 24, MAX_DYNSYM)
    table = w.read(symtab, 24 * count)
    want = name.encode()
    for i in range(count):
        st_name, info, _other, _shndx, value, _size = struct.unpack_from("<IBBHQQ", table, 24 * i)
        if info & 0xF != 2 or not value:  # STT_FUNC, defined
            continue
        got = w.read(strtab + st_name, len(want) + 1)
        if got == want + b"\0":
            return int(value)
    raise VmshieldError(f"no function {name!r} in the dynamic symbol table")


def locate(k: Kernel, path: str, offset: int | None, symbol: str | None = None) -> UserPoint:
    """Where ``offset`` (or ``symbol``) of the executable ``path`` is mapped, from a
    process running it."""
    tr = TaskReader(k)
    for task in tr.walk():
        try:
            if exe_path(k, task) != path:
                continue
        except VmshieldError:
            continue
        mm = k.u64(task + k.member_offset("task_struct", "mm"))
        w = mm_walker(k, mm)
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
        if symbol is not None:
            dyn = next((p for p in phs if p[0] == PT_DYNAMIC), None)
            if dyn is None:
                raise VmshieldError(f"{path} has no dynamic section: give the file offset")
            vaddr = _dynsym(w, bias, bias + dyn[3], symbol)
            seg = next((p for p in loads if p[3] <= vaddr < p[3] + p[5]), None)
            if seg is None:
                raise VmshieldError(f"{path}: {symbol} is in no loaded segment")
            offset = seg[2] + vaddr - seg[3]
        assert offset is not None
        for _t, flags, p_off, p_va, _pa, filesz, _m, _a in loads:
            if p_off <= offset < p_off + filesz:
                if not flags & 1:
                    raise VmshieldError(f"{path}: offset {offset:#x} is not in executable code")
                pid = k.s32(task + k.member_offset("task_struct", "tgid"))
                va = bias + p_va + offset - p_off
                return UserPoint(path, offset, va, symbol, bias != 0, pid)
        raise VmshieldError(f"{path}: offset {offset:#x} is in no loaded segment")
    raise VmshieldError(f"no process runs {path} now (start it, then arm the ufunc point)")


def decode(c: PointContext, point: UserPoint) -> dict[str, Any] | None:
    """The event fields, or None when the process at this address is another program."""
    if exe_path(c.kernel, c.current) != point.path:
        return None
    return {
        "path": point.path,
        "offset": point.offset,
        "symbol": point.symbol,
        "address": f"{point.address:#x}",
        "args": [f"{c.arg(i):#x}" for i in range(6)],
    }


def ufunc_object(name: str) -> CatalogObject:
    """``ufunc:PATH:SYMBOL|OFFSET`` before it is bound to a process (validation only;
    :func:`bound_object` gives the one a monitor arms). The security space patches
    kernel sites only, so there is no capture plan."""

    def unbound(c: PointContext) -> dict[str, Any] | None:
        raise VmshieldError(f"{name} was not resolved against a process")

    return CatalogObject(
        name, "user-space function", (), ("path", "offset", "symbol", "address", "args"),
        COMMON_FILTERS, NON_DENY, unbound,
    )  # fmt: skip


def bound_object(name: str, point: UserPoint) -> CatalogObject:
    """The object of ``name`` decoding hits at ``point``, located in a running process."""
    return replace(ufunc_object(name), decoder=lambda c: decode(c, point))
