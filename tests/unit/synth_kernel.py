"""A small synthetic guest kernel in synthetic RAM, attached with the real ``Kernel.attach``.

Page tables map a text page (``_text``), read-only data holding kallsyms (encoded the way
``scripts/kallsyms.c`` lays it out, by the encoder of test_kallsyms_synthetic) and a data
area holding ``linux_banner``, a BTF blob and whatever structures a test places there
(tasks, creds, modules). Everything else is unmapped, so a pointer outside the data area
is unreadable exactly as in a real guest. Used by the unit tests of the symbol cache, of
``ps``/``modules`` over broken structures and of the CLI's rendering of guest strings.
"""

from __future__ import annotations

import itertools
import random
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from tests.unit.test_btf import Builder
from tests.unit.test_kallsyms_synthetic import KERNEL_BASE, Sym, encode, make_symbols
from tests.unit.test_paging import KB4, NX, RW, P, Ram, Tables
from vmshield.guest.btf import Kind
from vmshield.guest.kernel import Kernel
from vmshield.guest.symcache import SymbolCache

TEXT_PA, RODATA_PA, DATA_PA = 0x10_0000, 0x20_0000, 0x60_0000
RODATA_VA, DATA_VA = KERNEL_BASE + 0x20_0000, KERNEL_BASE + 0x60_0000
DATA_SIZE = 0x1_0000
BANNER = b"Linux version 6.1.0-synthetic (test) #1 SMP\n\0"
BTF_AT = 0x100
UNMAPPED = 0xFFFF_8880_DEAD_0000  # a kernel address no page table maps

# Offsets of the synthetic structures (what the BTF below says).
TASK = {"flags": 0x10, "tasks": 0x20, "mm": 0x30, "pid": 0x40, "tgid": 0x44,
        "real_parent": 0x48, "cred": 0x50, "comm": 0x60}  # fmt: skip
TASK_SIZE = 0x80
CRED = {"uid": 0x4, "gid": 0x8, "euid": 0xC}
MODULE = {"list": 0x0, "state": 0x10, "name": 0x18, "core_layout": 0x50}
MODULE_SIZE = 0x80


def kernel_btf(pid_offset: int = TASK["pid"]) -> bytes:
    """BTF for task_struct, cred, module (with core_layout) and list_head; the offset
    of ``task_struct.pid`` can be moved (a guest whose BTF was rewritten)."""
    b = Builder()
    i32 = b.int_("int", 4, signed=True)
    u32 = b.int_("unsigned int", 4)
    u64 = b.int_("long unsigned int", 8)
    char = b.int_("char", 1)
    lh_fwd = b.raw("list_head", Kind.FWD, 0, 0)
    lh_ptr = b.ref(Kind.PTR, lh_fwd)
    lh = b.struct("list_head", 16, [("next", lh_ptr, 0), ("prev", lh_ptr, 64)])
    comm = b.array(char, i32, 16)
    mname = b.array(char, i32, 56)
    void_ptr = b.ref(Kind.PTR, 0)
    cred = b.struct("cred", 0x20, [(n, u32, o * 8) for n, o in CRED.items()])
    cred_ptr = b.ref(Kind.PTR, cred)
    layout = b.struct("module_layout", 16, [("base", void_ptr, 0), ("size", u32, 64)])
    task_fields: dict[str, tuple[int, int]] = {
        "flags": (u32, TASK["flags"]), "tasks": (lh, TASK["tasks"]), "mm": (void_ptr, TASK["mm"]),
        "pid": (i32, pid_offset), "tgid": (i32, TASK["tgid"]),
        "real_parent": (void_ptr, TASK["real_parent"]), "cred": (cred_ptr, TASK["cred"]),
        "comm": (comm, TASK["comm"]),
    }  # fmt: skip
    b.struct("task_struct", TASK_SIZE, [(n, t, o * 8) for n, (t, o) in task_fields.items()])
    b.struct(
        "module",
        MODULE_SIZE,
        [
            ("list", lh, MODULE["list"] * 8),
            ("state", i32, MODULE["state"] * 8),
            ("name", mname, MODULE["name"] * 8),
            ("core_layout", layout, MODULE["core_layout"] * 8),
        ],
    )
    _ = u64
    return b.build()


@dataclass
class SynthGuest:
    """Synthetic guest RAM; ``data`` places bytes at data-area virtual addresses."""

    ram: Ram
    tables: Tables
    symbols: dict[str, int] = field(default_factory=dict)

    def put(self, va: int, data: bytes) -> None:
        assert va >= DATA_VA and va + len(data) <= DATA_VA + DATA_SIZE, hex(va)
        pa = DATA_PA + va - DATA_VA
        self.ram.mem[pa : pa + len(data)] = data

    def u64(self, va: int, value: int) -> None:
        self.put(va, struct.pack("<Q", value))

    def u32(self, va: int, value: int) -> None:
        self.put(va, struct.pack("<I", value))

    def unmap_page(self, va: int) -> None:
        self.tables.unmap(va & ~(KB4 - 1))

    def attach(self, cache: SymbolCache | None = None) -> Kernel:
        return Kernel.attach(self.ram.read, self.tables.cr3, 0, cache)


SYMBOL_SLOTS = {"init_task": 0x2000, "modules": 0x4000, "current_task": 0x5000}


def make_guest(
    btf: bytes | None = None, fill: Callable[[SynthGuest], None] | None = None
) -> SynthGuest:
    """A guest whose kallsyms are the same for every call (same seed, same symbols);
    only the BTF and the data area's contents differ."""
    btf = kernel_btf() if btf is None else btf
    syms = make_symbols(random.Random(7), 400, KERNEL_BASE)
    named = {"linux_banner": DATA_VA, "__start_BTF": DATA_VA + BTF_AT,
             "__stop_BTF": DATA_VA + BTF_AT + len(btf)}  # fmt: skip
    named |= {n: DATA_VA + off for n, off in SYMBOL_SLOTS.items()}
    syms += [Sym("D", n, a) for n, a in named.items()]
    rodata = encode(syms, KERNEL_BASE, "6.1", seed=7, base_va=RODATA_VA, prefix=64).blob
    ram = Ram(8 << 20)
    tables = Tables(ram)
    tables.map(KERNEL_BASE, TEXT_PA, KB4, P)  # _text: read-only, executable
    ram.mem[TEXT_PA : TEXT_PA + 4] = b"\x0f\x1f\x44\x00"
    for off in range(0, len(rodata) + KB4 - 1, KB4):
        tables.map(RODATA_VA + off, RODATA_PA + off, KB4, P | NX)
    ram.mem[RODATA_PA : RODATA_PA + len(rodata)] = rodata
    for off in range(0, DATA_SIZE, KB4):
        tables.map(DATA_VA + off, DATA_PA + off, KB4, P | RW | NX)
    g = SynthGuest(ram, tables, named)
    g.put(DATA_VA, BANNER)
    g.put(DATA_VA + BTF_AT, btf)
    # empty lists: heads pointing at themselves
    for head in (named["init_task"] + TASK["tasks"], named["modules"]):
        g.u64(head, head)
        g.u64(head + 8, head)
    if fill:
        fill(g)
    return g


def link(g: SynthGuest, head: int, nodes: list[int]) -> None:
    """Make ``head -> nodes... -> head`` a circular list (next pointers and prev)."""
    ring = [head, *nodes, head]
    for a, b in itertools.pairwise(ring):
        g.u64(a, b)
        g.u64(b + 8, a)


def add_task(
    g: SynthGuest, at: int, pid: int, comm: bytes, cred: int, uid: int = 0, parent: int = 0
) -> int:
    """A user task (mm set) at ``DATA_VA + at``; its cred at ``cred`` (written when it
    lies in the data area). Returns the task's address."""
    task = DATA_VA + at
    g.u32(task + TASK["flags"], 0)
    g.u64(task + TASK["mm"], DATA_VA + 0x8000)
    g.u32(task + TASK["pid"], pid)
    g.u32(task + TASK["tgid"], pid)
    g.u64(task + TASK["real_parent"], parent or g.symbols["init_task"])
    g.u64(task + TASK["cred"], cred)
    g.put(task + TASK["comm"], comm[:15].ljust(16, b"\0"))
    if DATA_VA <= cred < DATA_VA + DATA_SIZE:
        for f in CRED:
            g.u32(cred + CRED[f], uid)
    return task


def add_module(g: SynthGuest, at: int, name: bytes, base: int = 0xFFFF_FFFF_C000_0000) -> int:
    mod = DATA_VA + at
    g.u32(mod + MODULE["state"], 0)
    g.put(mod + MODULE["name"], name.ljust(56, b"\0"))
    g.u64(mod + MODULE["core_layout"], base)
    g.u32(mod + MODULE["core_layout"] + 8, 0x3000)
    return mod
