"""The binary contract between the host and the in-guest agent.

Defined once, here, as ctypes structures; the C header the agent compiles against is
generated from them (:func:`c_header`), so the two sides cannot drift apart. Everything
the agent may write lives in the ring area; the config page is read-only in the guest
(only the host, through guest RAM, changes it).

Region: ``[text pages][config pages][ring of CPU 0][ring of CPU 1]...``
Ring: a :class:`RingHeader` then ``nslots`` fixed-size record slots, then one scratch
slot used when the ring is full (the agent still decides deny/kill; the record is
dropped and counted), then ``PATH_SCRATCH`` bytes where the agent builds a whole path
before it keeps the root-most part of it in the record. Every record carries ``seq``, the
low 32 bits of its ring position plus one, so that a record shown twice (a forged head)
is seen.
The geometry of a ring is known here only (:func:`ring_bytes`, :func:`slot_offset`,
:func:`path_scratch_offset`); the host's reader is :mod:`vmshield.space.rings`.
"""

from __future__ import annotations

import ctypes as C
from typing import Any

CONFIG_MAGIC = 0x31445349_4853_4D56  # "VMSHSID1" little-endian-ish tag
MAX_SITES = 48
MAX_FETCH = 6
MAX_RULES = 4
COMM_LEN = 16
RULE_PATH_LEN = 128
SLOT_SIZE = 1024
NSLOTS = 4096
PATH_SCRATCH = 4096  # PATH_MAX: d_absolute_path of any path the VFS accepts in one call

# fetch kinds
F_NONE, F_KMEM, F_KSTR, F_USTR, F_DPATH, F_ARGV = 0, 1, 2, 3, 4, 5
# fetch bases: 0..5 the argument registers, then these
B_CURRENT = 6
B_NONE = 0xFF
# rule actions evaluated in the guest
A_LOG, A_DENY, A_KILL = 0, 1, 2
# rule filter bits
R_PID, R_UID, R_COMM, R_PATH, R_PORT = 1, 2, 4, 8, 16
# item status
S_OK, S_FAULT, S_TRUNC = 0, 1, 2
# MSRs the agent may sample (config.msr_mask bits)
M_EFER, M_STAR, M_LSTAR, M_SYSENTER = 1, 2, 4, 8


class Fetch(C.Structure):
    """One datum to capture: ``base`` (+ ``off[i]`` then dereference, ``nderef`` times)
    ``+ off[nderef]`` is the address; ``kind`` says how to copy ``len`` bytes from it.
    F_DPATH with ``base2`` set appends ``/`` and the name at ``*(arg[base2] + off2)``.
    F_ARGV uses off = (bprm.mm, bprm.p, bprm.argc, mm.pgd)."""

    _fields_ = [
        ("kind", C.c_uint8), ("base", C.c_uint8), ("nderef", C.c_uint8),
        ("base2", C.c_uint8), ("len", C.c_uint16), ("pad", C.c_uint16),
        ("off", C.c_int32 * 4), ("off2", C.c_int32), ("pad2", C.c_uint32),
    ]  # fmt: skip


class Rule(C.Structure):
    """An in-guest decision: when every filter in ``has`` matches, apply ``action``."""

    _fields_ = [
        ("action", C.c_uint8), ("pad", C.c_uint8), ("has", C.c_uint16),
        ("pid", C.c_int32), ("uid", C.c_uint32), ("port", C.c_uint16), ("pad2", C.c_uint16),
        ("comm", C.c_char * COMM_LEN), ("path", C.c_char * RULE_PATH_LEN),
    ]  # fmt: skip


class Site(C.Structure):
    """A patched monitoring point. ``ret`` is the gate's return address (site + 5),
    by which the agent recognises which site called it."""

    _fields_ = [
        ("ret", C.c_uint64), ("nfetch", C.c_uint32), ("nrules", C.c_uint32),
        ("path_item", C.c_int32), ("port_item", C.c_int32), ("enabled", C.c_uint32),
        ("port_mode", C.c_uint32),
        ("fetch", Fetch * MAX_FETCH), ("rules", Rule * MAX_RULES),
    ]  # fmt: skip


class Config(C.Structure):
    """Everything the agent knows about this guest, filled in by the loader."""

    _fields_ = [
        ("magic", C.c_uint64), ("nsites", C.c_uint32), ("ncpus", C.c_uint32),
        ("slot_size", C.c_uint32), ("nslots", C.c_uint32),
        ("rings", C.c_uint64), ("ring_stride", C.c_uint64),
        ("page_offset_base", C.c_uint64), ("la57", C.c_uint32), ("msr_mask", C.c_uint32),
        ("sample_interval_ns", C.c_uint64),
        # per-cpu offsets (from GS base)
        ("pc_current", C.c_int64), ("pc_cpu", C.c_int64),
        # struct offsets (BTF)
        ("t_pid", C.c_int32), ("t_tgid", C.c_int32), ("t_parent", C.c_int32),
        ("t_cred", C.c_int32), ("t_comm", C.c_int32), ("t_signal", C.c_int32),
        ("t_tiflags", C.c_int32), ("sig_pending", C.c_int32),
        ("c_uid", C.c_int32), ("c_euid", C.c_int32), ("c_gid", C.c_int32),
        ("path_dentry", C.c_int32), ("dentry_name", C.c_int32),
        # the kernel's own top-level page table (direct-map address; 0: not checked), the
        # first index of its kernel half to compare, and the per-mm LDT slot to skip;
        # TIF_SIGPENDING's bit number, read from the kernel's code
        ("pgd_lo", C.c_int32), ("pgd_ldt", C.c_int32), ("tif_sigpending", C.c_int32),
        ("kernel_pgd", C.c_uint64),
        ("sites", Site * MAX_SITES),
    ]  # fmt: skip


class CpuSample(C.Structure):
    """Control state as the agent saw it on one CPU (ring 0 instructions). ``cr3`` is the
    page directory of the task that was running; ``pgd_bad`` counts samples where its
    kernel half was not the kernel's own (the last one: entry ``pgd_index`` held
    ``pgd_found``)."""

    _fields_ = [
        ("ns", C.c_uint64), ("count", C.c_uint64), ("cr0", C.c_uint64), ("cr4", C.c_uint64),
        ("efer", C.c_uint64), ("star", C.c_uint64), ("lstar", C.c_uint64),
        ("sysenter_eip", C.c_uint64), ("idt_base", C.c_uint64), ("gdt_base", C.c_uint64),
        ("idt_limit", C.c_uint16), ("gdt_limit", C.c_uint16), ("pgd_index", C.c_uint32),
        ("cr3", C.c_uint64), ("pgd_bad", C.c_uint64), ("pgd_found", C.c_uint64),
    ]  # fmt: skip


class RingHeader(C.Structure):
    """Per-CPU ring state. ``head`` is advanced by the agent after a record is complete;
    ``tail`` by the host after it read records. ``inflight`` is non-zero while the
    agent runs on this CPU (also the recursion guard)."""

    _fields_ = [
        ("head", C.c_uint64), ("tail", C.c_uint64), ("drops", C.c_uint64),
        ("inflight", C.c_uint64), ("hits", C.c_uint64), ("nested", C.c_uint64),
        ("denied", C.c_uint64), ("killed", C.c_uint64),
        ("sample", CpuSample), ("pad", C.c_uint8 * 80),
    ]  # fmt: skip


class Record(C.Structure):
    """The fixed header of one event record; ``data`` holds the captured items, each
    ``u16 len, u8 kind, u8 status`` then ``len`` bytes, 8-byte aligned."""

    _fields_ = [
        ("size", C.c_uint32), ("site", C.c_uint16), ("cpu", C.c_uint16),
        ("verdict", C.c_uint32), ("matched", C.c_uint32),
        ("ns", C.c_uint64), ("task", C.c_uint64),
        ("pid", C.c_int32), ("tgid", C.c_int32), ("ppid", C.c_int32),
        ("uid", C.c_uint32), ("euid", C.c_uint32), ("gid", C.c_uint32),
        ("comm", C.c_char * COMM_LEN), ("args", C.c_uint64 * 6),
        ("nitems", C.c_uint16), ("used", C.c_uint16), ("seq", C.c_uint32),
    ]  # fmt: skip


RECORD_DATA = SLOT_SIZE - C.sizeof(Record)
assert C.sizeof(RingHeader) == 256, C.sizeof(RingHeader)
assert C.sizeof(Record) == 128, C.sizeof(Record)


def ring_bytes(nslots: int = NSLOTS, slot_size: int = SLOT_SIZE) -> int:
    """Bytes of one CPU's ring, page-rounded (header, slots, the scratch slot, the path
    scratch area)."""
    n = path_scratch_offset(nslots, slot_size) + PATH_SCRATCH
    return (n + 0xFFF) & ~0xFFF


def slot_offset(position: int, nslots: int, slot_size: int = SLOT_SIZE) -> int:
    """Where the record of ring position ``position`` lives, from the ring's start."""
    return C.sizeof(RingHeader) + (position % nslots) * slot_size


def path_scratch_offset(nslots: int, slot_size: int = SLOT_SIZE) -> int:
    """The agent's path scratch area, from the ring's start (the agent computes the same
    from the config: header, ``nslots`` + 1 slots)."""
    return C.sizeof(RingHeader) + (nslots + 1) * slot_size


_CTYPE = {
    C.c_uint8: "u8", C.c_uint16: "u16", C.c_uint32: "u32", C.c_uint64: "u64",
    C.c_int32: "s32", C.c_int64: "s64", C.c_char: "char",
}  # fmt: skip


def _c_field(name: str, t: Any) -> str:
    if issubclass(t, C.Array):
        if issubclass(t._type_, C.Array):
            raise AssertionError("nested arrays are not used")
        return f"{_c_field(name, t._type_)}[{t._length_}]"
    if issubclass(t, C.Structure):
        return f"struct vms_{t.__name__.lower()} {name}"
    return f"{_CTYPE[t]} {name}"


def c_header() -> str:
    """The agent's view of this module: typedefs, constants, structs (with size checks)."""
    out = [
        "/* Generated from vmshield/space/layout.py: do not edit. */",
        "#pragma once",
        "typedef unsigned char u8; typedef unsigned short u16; typedef unsigned int u32;",
        "typedef unsigned long long u64; typedef int s32; typedef long long s64;",
    ]
    consts = {k: v for k, v in globals().items() if k.isupper() and isinstance(v, int)}
    out += [f"#define VMS_{k} {v:#x}ULL" if v > 0x7FFFFFFF else f"#define VMS_{k} {v}"
            for k, v in consts.items()]  # fmt: skip
    for st in (Fetch, Rule, Site, Config, CpuSample, RingHeader, Record):
        out.append(f"struct vms_{st.__name__.lower()} {{")
        for fname, ftype, *_ in st._fields_:
            out.append(f"\t{_c_field(fname, ftype)};")
        out.append("} __attribute__((packed, aligned(8)));")
        out.append(
            f"_Static_assert(sizeof(struct vms_{st.__name__.lower()}) == {C.sizeof(st)}, "
            f'"{st.__name__} size");'
        )
    return "\n".join(out) + "\n"
