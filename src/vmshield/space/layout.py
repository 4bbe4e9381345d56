"""The binary contract between the host and the in-guest agent.

Defined once, here, as ctypes structures; the C header the agent compiles against is
generated from them (:func:`c_header`), so the two sides cannot drift apart. Everything
the agent may write lives in the ring area; the config page is read-only in the guest
(only the host, through guest RAM, changes it).

Region: ``[text pages][config pages][ring of CPU 0][ring of CPU 1]...``
Ring: a :class:`RingHeader`, then ``ring_size`` bytes (a power of two) of variable-size
records, then one scratch record (``RECORD_MAX`` bytes) used when the ring is full (the
agent still decides deny/kill; the record is dropped and counted), then ``PATH_SCRATCH``
bytes where the agent builds a whole path before it keeps the root-most part of it in
the record.

Records are sized by their content (issue 12): the 80-byte :class:`Record` header, the
argument registers the object's decoder needs (``nargs``, 0 to 6), then the captured
items, each ``u16 len, u8 kind, u8 status`` and ``len`` bytes (strings only as long as
they are), 8-byte aligned; ``size`` is the whole record, a multiple of 8. ``head`` and
``tail`` are byte positions that only grow (the offset in the ring is the position modulo
``ring_size``). A record never wraps: when the room left before the ring's end is less
than the site's largest record, the agent first writes a pad record (``size`` with
``PAD_FLAG`` set, 8 bytes of header at least) up to the end. Every record, pad included,
carries ``seq``: the low 32 bits of its position / 8, plus one, so a record shown at
another position (a forged head, a replay) is seen.
The geometry of a ring is known here only (:func:`ring_bytes`, :func:`data_offset`,
:func:`scratch_record_offset`, :func:`path_scratch_offset`, :func:`record_seq`); the
host's reader is :mod:`vmshield.space.rings`.
"""

from __future__ import annotations

import ctypes as C
from typing import Any

CONFIG_MAGIC = 0x31445349_4853_4D56  # "VMSHSID1" little-endian-ish tag
MAX_SITES = 48
MAX_FETCH = 6
MAX_RULES = 8
COMM_LEN = 16
RULE_PROG = 224  # bytes of glob programs per rule (every text filter of the request)
AGG_KEY_LEN = 48  # the leading bytes of an aggregation key's text kept in its slot
RECORD_MAX = 1024  # header + arguments + items of the largest record a site may write
RING_SIZE = 4 << 20  # bytes of records per CPU (the default; sized from guest RAM)
RING_MIN = 64 << 10
RING_MAX = 256 << 20
PAD_FLAG = 0x80000000  # in Record.size: a pad up to the ring's end, no event
PATH_SCRATCH = 4096  # PATH_MAX: d_absolute_path of any path the VFS accepts in one call
AGG_SLOTS = 128  # per-CPU aggregation table (--aggregate), a power of two
AGG_PROBE = 8  # slots the agent tries before it writes an ordinary record

# fetch kinds
F_NONE, F_KMEM, F_KSTR, F_USTR, F_DPATH, F_ARGV = 0, 1, 2, 3, 4, 5
# fetch bases: 0..5 the argument registers, then these
B_CURRENT = 6
B_NONE = 0xFF
# rule actions evaluated in the guest
A_LOG, A_DENY, A_KILL = 0, 1, 2
# rule filter bits: numbers, then one per text filter (a glob program on the text the
# exit engine would compare: T_* index Rule.at and the agent's subjects, bit 4 << T_*);
# R_NEVER: a filter no value can match (a pid that is not a number); R_HOST: a pattern
# too long for the rule (the host checks every filter of a record the rule let through)
R_PID, R_UID = 1, 2
T_COMM, T_PATH, T_ADDR, T_PORT, T_ESC, T_CHG, T_COUNT = 0, 1, 2, 3, 4, 5, 6
R_COMM, R_PATH, R_ADDR, R_PORT, R_ESC, R_CHANGED = 4, 8, 16, 32, 64, 128
R_NEVER, R_HOST = 0x4000, 0x8000
# glob program tokens (see space/rules.py): printable ASCII bytes are themselves
G_END, G_STAR, G_ANY, G_LIT, G_CLASS, G_ALT = 0, 1, 2, 3, 4, 5
# Site.net_flags: IPv6 text writes an IPv4-mapped address in dotted form (the host's
# Python does so from 3.13 on)
N_V4MAPPED_DOTTED = 1
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
    """An in-guest decision: when every filter in ``has`` matches, apply ``action``
    (``A_LOG``: only record). One rule per request at a site; a hit no rule matches
    takes no ring space. ``pid``/``uid`` compare numbers; every other filter is a glob
    program in ``prog`` starting at ``at[T_*]`` (the pattern compiled by the host,
    character classes resolved to code-point ranges), matched against the text the exit
    engine would compare (the path, the address as Python prints it, the port in
    decimal, ``True``/``False``/``None``)."""

    _fields_ = [
        ("action", C.c_uint8), ("pad", C.c_uint8), ("has", C.c_uint16),
        ("pid", C.c_int32), ("uid", C.c_uint32), ("pad2", C.c_uint32),
        ("at", C.c_uint16 * T_COUNT), ("pad3", C.c_uint32),
        ("prog", C.c_uint8 * RULE_PROG),
    ]  # fmt: skip


class Site(C.Structure):
    """A patched monitoring point. ``ret`` is the gate's return address (site + 5),
    by which the agent recognises which site called it. ``nargs``: argument registers
    kept in the record; ``max_size``: the largest record the fetches can make (the room
    the agent reserves before it captures). What the filters compare is found in the
    items: the path at ``path_item``; the address and port at ``port_item``
    (``port_mode`` 0 a ``struct sockaddr``, 1 the three ``sock_common`` items of
    listen); ``cred_off`` (cred.change, ``cred_item`` >= 0): uid, euid, gid, egid, fsuid,
    cap_effective within items ``cred_item`` (new) and the next (old).
    ``need_items``: items whose fault makes the host's decoder give no fields at all
    (then every field filter compares ``None``, as the exit engine's would).
    ``aggregate``: 0 off, else 1 + the key kind (``K_*``)."""

    _fields_ = [
        ("ret", C.c_uint64), ("nfetch", C.c_uint32), ("nrules", C.c_uint32),
        ("path_item", C.c_int32), ("port_item", C.c_int32), ("enabled", C.c_uint32),
        ("port_mode", C.c_uint32), ("nargs", C.c_uint32), ("max_size", C.c_uint32),
        ("aggregate", C.c_uint32), ("need_items", C.c_uint32),
        ("cred_off", C.c_uint16 * 6), ("cred_item", C.c_int16), ("net_flags", C.c_uint16),
        ("fetch", Fetch * MAX_FETCH), ("rules", Rule * MAX_RULES),
    ]  # fmt: skip


class Config(C.Structure):
    """Everything the agent knows about this guest, filled in by the loader."""

    _fields_ = [
        ("magic", C.c_uint64), ("nsites", C.c_uint32), ("ncpus", C.c_uint32),
        ("ring_size", C.c_uint64),
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
    """Per-CPU ring state. ``head`` (a byte position) is advanced by the agent after a
    record is complete; ``tail`` by the host after it read records. ``inflight`` is
    non-zero while the agent runs on this CPU (also the recursion guard). Every hit ends
    as a published record (``records``), a drop, or filtered out in the guest
    (``filtered``: no request wanted it)."""

    _fields_ = [
        ("head", C.c_uint64), ("tail", C.c_uint64), ("drops", C.c_uint64),
        ("inflight", C.c_uint64), ("hits", C.c_uint64), ("nested", C.c_uint64),
        ("denied", C.c_uint64), ("killed", C.c_uint64),
        ("records", C.c_uint64), ("filtered", C.c_uint64), ("aggregated", C.c_uint64),
        ("sample", CpuSample), ("pad", C.c_uint8 * 56),
    ]  # fmt: skip


# aggregation key kinds (Site.aggregate - 1): which text of a hit its slot is keyed by
K_NONE, K_PATH, K_NET, K_EUID, K_NAME = 0, 1, 2, 3, 4


class AggSlot(C.Structure):
    """One line of a CPU's aggregation table: hits of ``site`` by one task with one key
    counted instead of recorded. The key is the object's own (``K_*``: the path or
    program, the address and port, the new euid, the module name; none for ``kfunc:``):
    ``key`` is a 64-bit hash of its whole text, ``ktext`` its first ``AGG_KEY_LEN``
    bytes (``klen``: the whole length, so the host says when it shows only a start).
    The agent claims a free slot (``count`` 0) by filling it and then setting
    ``count``; slots are never freed, so the host reads counts that only grow."""

    _fields_ = [
        ("count", C.c_uint64), ("key", C.c_uint64), ("pid", C.c_int32), ("tgid", C.c_int32),
        ("uid", C.c_uint32), ("site", C.c_uint16), ("klen", C.c_uint16),
        ("comm", C.c_char * COMM_LEN), ("ktext", C.c_uint8 * AGG_KEY_LEN),
    ]  # fmt: skip


class Record(C.Structure):
    """The header of one event record (``size`` and ``seq`` first: a pad record is
    these 8 bytes alone); ``nargs`` argument registers and ``nitems`` items follow."""

    _fields_ = [
        ("size", C.c_uint32), ("seq", C.c_uint32),
        ("site", C.c_uint16), ("cpu", C.c_uint16), ("nitems", C.c_uint16),
        ("nargs", C.c_uint8), ("verdict", C.c_uint8),
        ("ns", C.c_uint64), ("matched", C.c_uint32), ("flags", C.c_uint32),
        # who: contiguous, so that the host caches a process by these bytes alone
        ("pid", C.c_int32), ("tgid", C.c_int32), ("ppid", C.c_int32),
        ("uid", C.c_uint32), ("euid", C.c_uint32), ("gid", C.c_uint32),
        ("task", C.c_uint64), ("comm", C.c_char * COMM_LEN),
    ]  # fmt: skip


RECORD_HEADER = C.sizeof(Record)
PROCESS_BYTES = (Record.pid.offset, RECORD_HEADER)  # the record's "who", to the end

_STRUCT_CODE: dict[Any, str] = {
    C.c_uint8: "B", C.c_uint16: "H", C.c_uint32: "I", C.c_uint64: "Q", C.c_int16: "h",
    C.c_int32: "i", C.c_int64: "q",
}  # fmt: skip


def struct_format(st: type[C.Structure], first: str, last: str) -> tuple[str, int]:
    """A ``struct`` format for the fields ``first`` to ``last`` of ``st`` (packed, little
    endian) and the offset of ``first``: the host's fast readers unpack records with it,
    so their field order comes from here too."""
    names = [f[0] for f in st._fields_]
    out = "<"
    for _name, t, *_ in st._fields_[names.index(first) : names.index(last) + 1]:
        if issubclass(t, C.Array) and getattr(t, "_type_", None) is C.c_char:
            out += f"{t._length_}s"
        else:
            out += _STRUCT_CODE[t]
    return out, int(getattr(st, first).offset)


# Room for items in the largest record: RECORD_MAX less the header and six arguments.
RECORD_DATA = RECORD_MAX - RECORD_HEADER - 6 * 8
assert C.sizeof(RingHeader) == 256, C.sizeof(RingHeader)
assert RECORD_HEADER == 80, RECORD_HEADER


def record_seq(position: int) -> int:
    """The ``seq`` a record written at byte position ``position`` carries (never 0 for
    the first 2^35 bytes: a zeroed ring holds no record)."""
    return ((position >> 3) + 1) & 0xFFFFFFFF


def data_offset() -> int:
    """Where ring position 0 lives, from the ring's start."""
    return C.sizeof(RingHeader)


def scratch_record_offset(ring_size: int) -> int:
    """The record the agent fills when the ring is full (never read by the host)."""
    return C.sizeof(RingHeader) + ring_size


def path_scratch_offset(ring_size: int) -> int:
    """The agent's path scratch area, from the ring's start (the agent computes the same
    from the config)."""
    return scratch_record_offset(ring_size) + RECORD_MAX


def agg_offset(ring_size: int) -> int:
    """The CPU's aggregation table (``AGG_SLOTS`` :class:`AggSlot`), from the ring's start."""
    return path_scratch_offset(ring_size) + PATH_SCRATCH


def ring_bytes(ring_size: int = RING_SIZE) -> int:
    """Bytes of one CPU's ring, page-rounded (header, records, the scratch record, the
    path scratch area, the aggregation table)."""
    n = agg_offset(ring_size) + AGG_SLOTS * C.sizeof(AggSlot)
    return (n + 0xFFF) & ~0xFFF


def check_ring_size(size: int) -> int:
    """``size`` if it is a usable ring size (a power of two in bounds), else ValueError."""
    if size & (size - 1) or not RING_MIN <= size <= RING_MAX:
        raise ValueError(
            f"ring size {size}: a power of two from {RING_MIN >> 10} KiB to {RING_MAX >> 20} MiB"
        )
    return size


_CTYPE = {
    C.c_uint8: "u8", C.c_uint16: "u16", C.c_uint32: "u32", C.c_uint64: "u64",
    C.c_int16: "s16", C.c_int32: "s32", C.c_int64: "s64", C.c_char: "char",
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
        "typedef unsigned long long u64; typedef short s16; typedef int s32;",
        "typedef long long s64;",
    ]
    consts = {k: v for k, v in globals().items() if k.isupper() and isinstance(v, int)}
    out += [f"#define VMS_{k} {v:#x}ULL" if v > 0x7FFFFFFF else f"#define VMS_{k} {v}"
            for k, v in consts.items()]  # fmt: skip
    for st in (Fetch, Rule, Site, Config, CpuSample, RingHeader, AggSlot, Record):
        out.append(f"struct vms_{st.__name__.lower()} {{")
        for fname, ftype, *_ in st._fields_:
            out.append(f"\t{_c_field(fname, ftype)};")
        out.append("} __attribute__((packed, aligned(8)));")
        out.append(
            f"_Static_assert(sizeof(struct vms_{st.__name__.lower()}) == {C.sizeof(st)}, "
            f'"{st.__name__} size");'
        )
    return "\n".join(out) + "\n"
