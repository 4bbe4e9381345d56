"""Tests of the BTF parser: real kernels' BTF, hand-made blobs, and hostile mutations.

The expected offsets below were checked during development against two independent tools:
``bpftool btf dump ... format raw`` (every record of the 6.1 and 6.12 blobs decodes to the
same text) and gcc's ``offsetof`` over ``bpftool ... format c`` headers (about 160k member
offsets and struct sizes across the three kernels agree). The 7.3 expectations were checked
the same way (bpftool 7.1's raw dump for the counts, ids, enumerators and the bitfield;
gcc ``offsetof``/``sizeof`` over its C dump for every offset and size listed). Neither
tool is needed to run these tests.

The real blobs come from the vmlinux files ``make setup`` downloads; they are read with a
small ELF section reader below, standard library only.
"""

from __future__ import annotations

import contextlib
import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmshield.errors import GuestFormatError, SymbolError
from vmshield.guest.btf import MAX_CHAIN, MAX_NESTING, Btf, Kind, parse_btf
from vmshield.paths import kernels_dir

KERNELS = ("5.10", "6.1", "6.12", "7.3")

# --------------------------------------------------------------------------- real blobs


def read_elf_section(path: Path, wanted: str) -> bytes:
    """Bytes of section ``wanted`` of a little-endian ELF64 file (vmlinux)."""
    with path.open("rb") as elf:
        ehdr = elf.read(64)
        assert ehdr[:4] == b"\x7fELF", f"{path} is not an ELF file"
        assert ehdr[4] == 2 and ehdr[5] == 1, f"{path} is not a little-endian ELF64 file"
        (shoff,) = struct.unpack_from("<Q", ehdr, 0x28)
        shentsize, shnum, shstrndx = struct.unpack_from("<HHH", ehdr, 0x3A)
        elf.seek(shoff)
        table = elf.read(shentsize * shnum)
        headers = [struct.unpack_from("<IIQQQQIIQQ", table, i * shentsize) for i in range(shnum)]
        names_hdr = headers[shstrndx]
        elf.seek(names_hdr[4])
        names = elf.read(names_hdr[5])
        for header in headers:
            name = names[header[0] : names.index(b"\0", header[0])].decode()
            if name == wanted:
                elf.seek(header[4])
                return elf.read(header[5])
    raise AssertionError(f"{path} has no {wanted} section")


@cache
def real_blob(version: str) -> bytes:
    """The raw ``.BTF`` section of a downloaded kernel; a missing kernel fails the test."""
    path = kernels_dir() / version / "vmlinux"
    if not path.is_file():
        pytest.fail(
            f"kernel {version} not found at {path}: run `make setup` to download the test "
            "kernels (these tests need their BTF)",
            pytrace=False,
        )
    return read_elf_section(path, ".BTF")


@cache
def real_btf(version: str) -> Btf:
    return Btf.parse(real_blob(version))


@dataclass(frozen=True)
class Expected:
    type_count: int
    func_count: int
    task_struct_id: int
    offsets: dict[tuple[str, str], int]
    sizes: dict[str, int]
    bitfield: tuple[int, int]  # task_struct.sched_reset_on_fork (bit offset, width)
    # PERF_EVENT_STATE_DEAD: -4 until PERF_EVENT_STATE_REVOKED took -4 (after 6.12)
    perf_state_dead: int = -4


# Checked against gcc offsetof on bpftool's C dump, and bpftool's raw dump.
EXPECTED: dict[str, Expected] = {
    "5.10": Expected(
        type_count=77597,
        func_count=32357,
        task_struct_id=132,
        offsets={
            ("task_struct", "comm"): 2736,
            ("task_struct", "tasks"): 1976,
            ("task_struct", "real_parent"): 2248,
            ("task_struct", "parent"): 2256,
            ("task_struct", "tgid"): 2236,
            ("task_struct", "pid"): 2232,
            ("task_struct", "cred"): 2720,
            ("task_struct", "real_cred"): 2712,
            ("task_struct", "mm"): 2056,
            ("task_struct", "thread_pid"): 2336,
            ("task_struct", "files"): 2808,
            ("task_struct", "children"): 2264,
            ("task_struct", "group_leader"): 2296,
            ("task_struct", "flags"): 36,
            ("task_struct", "state"): 16,
            ("task_struct", "rcu_users"): 4696,  # inside an anonymous union
            ("task_struct", "se.vruntime"): 208,
            ("cred", "uid"): 8,
            ("cred", "euid"): 24,
            ("cred", "cap_effective"): 60,
            ("file", "f_path"): 16,
            ("file", "f_path.dentry"): 24,
            ("file", "f_path.mnt"): 16,
            ("file", "f_inode"): 32,
            ("module", "list"): 8,
            ("module", "name"): 24,
            ("module", "state"): 0,
            ("dentry", "d_name"): 32,
            ("dentry", "d_parent"): 24,
            ("mm_struct", "pgd"): 80,  # inside an anonymous struct
            ("mm_struct", "mmap_lock"): 120,
            ("qstr", "name"): 8,
            ("list_head", "next"): 0,
            ("list_head", "prev"): 8,
        },
        sizes={
            "list_head": 16,
            "task_struct": 9344,
            "cred": 168,
            "file": 256,
            "module": 960,
            "mm_struct": 1032,
        },
        bitfield=(17312, 1),
    ),
    "6.1": Expected(
        type_count=95068,
        func_count=41981,
        task_struct_id=191,
        offsets={
            ("task_struct", "comm"): 2976,
            ("task_struct", "tasks"): 2192,
            ("task_struct", "real_parent"): 2432,
            ("task_struct", "parent"): 2440,
            ("task_struct", "tgid"): 2420,
            ("task_struct", "pid"): 2416,
            ("task_struct", "cred"): 2960,
            ("task_struct", "real_cred"): 2952,
            ("task_struct", "mm"): 2272,
            ("task_struct", "thread_pid"): 2520,
            ("task_struct", "files"): 3048,
            ("task_struct", "children"): 2448,
            ("task_struct", "group_leader"): 2480,
            ("task_struct", "flags"): 44,
            ("task_struct", "__state"): 24,
            ("task_struct", "rcu_users"): 4968,  # inside an anonymous union
            ("task_struct", "se.vruntime"): 208,
            ("cred", "uid"): 8,
            ("cred", "euid"): 24,
            ("cred", "cap_effective"): 60,
            ("file", "f_path"): 16,
            ("file", "f_path.dentry"): 24,
            ("file", "f_path.mnt"): 16,
            ("file", "f_inode"): 32,
            ("module", "list"): 8,
            ("module", "name"): 24,
            ("module", "state"): 0,
            ("dentry", "d_name"): 32,
            ("dentry", "d_parent"): 24,
            ("mm_struct", "pgd"): 72,  # inside an anonymous struct
            ("mm_struct", "mmap_lock"): 112,
            ("qstr", "name"): 8,
            ("list_head", "next"): 0,
            ("list_head", "prev"): 8,
        },
        sizes={
            "list_head": 16,
            "task_struct": 9728,
            "cred": 176,
            "file": 232,
            "module": 896,
            "mm_struct": 1088,
        },
        bitfield=(18720, 1),
    ),
    "6.12": Expected(
        type_count=108407,
        func_count=47913,
        task_struct_id=112,
        offsets={
            ("task_struct", "comm"): 2976,
            ("task_struct", "tasks"): 2224,
            ("task_struct", "real_parent"): 2448,
            ("task_struct", "parent"): 2456,
            ("task_struct", "tgid"): 2436,
            ("task_struct", "pid"): 2432,
            ("task_struct", "cred"): 2960,
            ("task_struct", "real_cred"): 2952,
            ("task_struct", "mm"): 2304,
            ("task_struct", "thread_pid"): 2536,
            ("task_struct", "files"): 3048,
            ("task_struct", "children"): 2464,
            ("task_struct", "group_leader"): 2496,
            ("task_struct", "flags"): 44,
            ("task_struct", "__state"): 24,
            ("task_struct", "rcu_users"): 5144,
            ("task_struct", "se.vruntime"): 240,
            ("cred", "uid"): 8,
            ("cred", "euid"): 24,
            ("cred", "cap_effective"): 64,
            ("file", "f_path"): 64,
            ("file", "f_path.dentry"): 72,
            ("file", "f_path.mnt"): 64,
            ("file", "f_inode"): 40,
            ("module", "list"): 8,
            ("module", "name"): 24,
            ("module", "state"): 0,
            ("dentry", "d_name"): 32,
            ("dentry", "d_parent"): 24,
            ("mm_struct", "pgd"): 120,  # inside an anonymous struct
            ("mm_struct", "mmap_lock"): 168,
            ("qstr", "name"): 8,
            ("list_head", "next"): 0,
            ("list_head", "prev"): 8,
        },
        sizes={
            "list_head": 16,
            "task_struct": 9792,
            "cred": 184,
            "file": 184,
            "module": 1280,
            "mm_struct": 1344,
        },
        bitfield=(18848, 1),
    ),
    "7.3": Expected(
        # 7.3's BTF is sorted by name (FUNC 'zswpout_show' is the last record), so
        # task_struct has a high id, and the one DATASEC sits among the rest.
        type_count=121184,
        func_count=53265,
        task_struct_id=110917,
        offsets={
            ("task_struct", "comm"): 3408,
            ("task_struct", "tasks"): 2664,
            ("task_struct", "real_parent"): 2888,
            ("task_struct", "parent"): 2896,
            ("task_struct", "tgid"): 2876,
            ("task_struct", "pid"): 2872,
            ("task_struct", "cred"): 3392,
            ("task_struct", "real_cred"): 3384,
            ("task_struct", "mm"): 2744,
            ("task_struct", "thread_pid"): 2976,
            ("task_struct", "files"): 3488,
            ("task_struct", "children"): 2904,
            ("task_struct", "group_leader"): 2936,
            ("task_struct", "flags"): 44,
            ("task_struct", "__state"): 24,
            ("task_struct", "rcu_users"): 5704,
            ("task_struct", "se.vruntime"): 264,
            ("cred", "uid"): 8,
            ("cred", "euid"): 24,
            ("cred", "cap_effective"): 64,
            ("file", "f_path"): 64,
            ("file", "f_path.dentry"): 72,
            ("file", "f_path.mnt"): 64,
            ("file", "f_inode"): 32,
            ("module", "list"): 8,
            ("module", "name"): 24,
            ("module", "state"): 0,
            ("dentry", "d_name"): 32,
            ("dentry", "d_parent"): 24,
            ("mm_struct", "pgd"): 120,  # inside an anonymous struct
            ("mm_struct", "mmap_lock"): 408,
            ("qstr", "name"): 8,
            ("list_head", "next"): 0,
            ("list_head", "prev"): 8,
        },
        sizes={
            "list_head": 16,
            "task_struct": 6144,
            "cred": 184,
            "file": 176,
            "module": 1280,
            "mm_struct": 1728,
        },
        bitfield=(22368, 1),
        perf_state_dead=-5,
    ),
}


@pytest.mark.parametrize("version", KERNELS)
def test_real_kernel_parses_fast_and_fully(version: str) -> None:
    blob = real_blob(version)
    start = time.perf_counter()
    btf = Btf.parse(blob)
    parse_seconds = time.perf_counter() - start
    btf.validate()
    total_seconds = time.perf_counter() - start
    expected = EXPECTED[version]
    assert btf.type_count == expected.type_count
    assert sum(1 for _ in btf.func_names()) == expected.func_count
    # Measured ~0.05-0.09 s to index and ~0.5 s including validate(); generous bounds
    # so a slow CI machine does not flake, tight enough to catch an accidental O(n^2).
    assert parse_seconds < 1.0, f"parse took {parse_seconds:.3f} s"
    assert total_seconds < 5.0, f"parse + validate took {total_seconds:.3f} s"


@pytest.mark.parametrize("version", KERNELS)
def test_real_kernel_offsets(version: str) -> None:
    btf = real_btf(version)
    expected = EXPECTED[version]
    assert btf.find_struct("task_struct") == expected.task_struct_id
    assert btf.find_struct("struct task_struct") == expected.task_struct_id
    for (struct_name, path), offset in expected.offsets.items():
        assert btf.member_offset(struct_name, path) == offset, (struct_name, path)
    for struct_name, size in expected.sizes.items():
        assert btf.sizeof(struct_name) == size, struct_name
        assert btf.sizeof(f"struct {struct_name}") == size, struct_name
    assert (
        btf.member_offset(expected.task_struct_id, "comm")
        == expected.offsets[("task_struct", "comm")]
    )


@pytest.mark.parametrize("version", KERNELS)
def test_real_kernel_sizes(version: str) -> None:
    btf = real_btf(version)
    assert btf.sizeof("pid_t") == 4
    assert btf.sizeof("kuid_t") == 4
    assert btf.sizeof("u64") == 8
    assert btf.sizeof("char") == 1
    assert btf.sizeof("long unsigned int") == 8
    assert btf.sizeof("struct task_struct *") == 8
    assert btf.sizeof("void *") == 8
    assert btf.sizeof(btf.member_type("task_struct", "comm").type_id) == 16
    with pytest.raises(SymbolError, match="no size"):
        btf.sizeof("void")
    with pytest.raises(SymbolError, match="not found"):
        btf.sizeof("struct no_such_struct_anywhere")
    with pytest.raises(SymbolError, match="not found"):
        btf.sizeof("no_such_type *")


@pytest.mark.parametrize("version", KERNELS)
def test_real_kernel_member_types(version: str) -> None:
    btf = real_btf(version)
    comm = btf.member_type("task_struct", "comm")
    assert (comm.kind, comm.size, comm.nelems) == (Kind.ARRAY, 16, 16)
    assert (comm.target_kind, comm.target_name) == (Kind.INT, "char")
    assert comm.c_type == "char[16]"

    parent = btf.member_type("task_struct", "real_parent")
    assert (parent.kind, parent.size) == (Kind.PTR, 8)
    assert (parent.target_kind, parent.target_name) == (Kind.STRUCT, "task_struct")
    assert parent.target_id == EXPECTED[version].task_struct_id
    assert parent.c_type == "struct task_struct *"

    cred = btf.member_type("task_struct", "cred")
    assert (cred.kind, cred.target_kind, cred.target_name) == (Kind.PTR, Kind.STRUCT, "cred")
    assert cred.c_type == "const struct cred *"

    pid = btf.member_type("task_struct", "pid")
    assert (pid.kind, pid.name, pid.size, pid.c_type) == (Kind.INT, "int", 4, "pid_t")

    tasks = btf.member_type("task_struct", "tasks")
    assert (tasks.kind, tasks.name, tasks.size) == (Kind.STRUCT, "list_head", 16)

    euid = btf.member_type("cred", "euid")
    assert (euid.kind, euid.name, euid.c_type) == (Kind.STRUCT, "", "kuid_t")

    dentry = btf.member_type("file", "f_path.dentry")
    assert (dentry.target_kind, dentry.target_name) == (Kind.STRUCT, "dentry")


@pytest.mark.parametrize("version", KERNELS)
def test_real_kernel_bitfield(version: str) -> None:
    btf = real_btf(version)
    bit_offset, width = EXPECTED[version].bitfield
    assert btf.member_bit_offset("task_struct", "sched_reset_on_fork") == (bit_offset, width)
    with pytest.raises(SymbolError, match="bitfield"):
        btf.member_offset("task_struct", "sched_reset_on_fork")
    desc = btf.member_type("task_struct", "sched_reset_on_fork")
    assert desc.bitfield_size == 1
    assert desc.c_type.endswith(":1")
    comm_offset = EXPECTED[version].offsets[("task_struct", "comm")]
    assert btf.member_bit_offset("task_struct", "comm") == (comm_offset * 8, 128)


@pytest.mark.parametrize("version", KERNELS)
def test_real_kernel_missing_names(version: str) -> None:
    btf = real_btf(version)
    with pytest.raises(SymbolError, match=r"'task_struct' has no member 'no_such_member'"):
        btf.member_offset("task_struct", "no_such_member")
    with pytest.raises(SymbolError, match=r"'file\.f_path' has no member 'nope'"):
        btf.member_offset("file", "f_path.nope")
    with pytest.raises(SymbolError, match="not found"):
        btf.find_struct("no_such_struct_anywhere")
    # Through a pointer is not an embedded path: it would need a memory read.
    with pytest.raises(SymbolError, match="not an embedded struct"):
        btf.member_offset("task_struct", "mm.pgd")
    with pytest.raises(SymbolError, match="invalid member path"):
        btf.member_offset("task_struct", "comm..x")
    missing_state = "__state" if version == "5.10" else "state"
    with pytest.raises(SymbolError, match=missing_state):
        btf.member_offset("task_struct", missing_state)


@pytest.mark.parametrize("version", KERNELS)
def test_real_kernel_enums_and_funcs(version: str) -> None:
    btf = real_btf(version)
    assert btf.enum_value("module_state", "MODULE_STATE_GOING") == 2
    assert btf.enum_value(None, "MODULE_STATE_UNFORMED") == 3
    # A negative enumerator: 5.10's encoder predates the signedness flag, 6.x sets it.
    dead = EXPECTED[version].perf_state_dead
    assert btf.enum_value("perf_event_state", "PERF_EVENT_STATE_DEAD") == dead
    assert btf.enum_value("enum perf_event_state", "PERF_EVENT_STATE_ACTIVE") == 1
    with pytest.raises(SymbolError):
        btf.enum_value("module_state", "NOPE")
    with pytest.raises(SymbolError):
        btf.enum_value(None, "NO_SUCH_ENUMERATOR_ANYWHERE")
    names = set(btf.func_names())
    assert {"schedule", "do_exit", "commit_creds"} <= names
    assert btf.kind(btf.ids_by_name("schedule")[0]) == Kind.FUNC


def test_6_12_specific_kinds() -> None:
    """6.12 carries DECL_TAG (``bpf_kfunc``), ENUM64, FLOAT, VAR and DATASEC records."""
    btf = real_btf("6.12")
    counts: dict[Kind, int] = {}
    for type_id in range(1, btf.type_count + 1):
        kind = btf.kind(type_id)
        counts[kind] = counts.get(kind, 0) + 1
    assert counts[Kind.DECL_TAG] == 132
    assert counts[Kind.ENUM64] == 8
    assert counts[Kind.FLOAT] == 1
    assert counts[Kind.VAR] == 384
    assert counts[Kind.DATASEC] == 1
    datasec = btf.type(btf.type_count)
    assert (datasec.kind, datasec.name, datasec.vlen) == (Kind.DATASEC, ".data..percpu", 384)
    tag = next(btf.iter_types(Kind.DECL_TAG))
    assert (tag.name, tag.component_idx) == ("bpf_kfunc", -1)
    assert btf.kind(tag.ref) == Kind.FUNC


def test_7_3_specific_kinds() -> None:
    """7.3 adds TYPE_TAG records and a second DECL_TAG (``bpf_fastcall``), and sorts its
    records by name: the counts of every kind match bpftool's raw dump."""
    btf = real_btf("7.3")
    counts: dict[Kind, int] = {}
    for type_id in range(1, btf.type_count + 1):
        kind = btf.kind(type_id)
        counts[kind] = counts.get(kind, 0) + 1
    assert counts == {
        Kind.ARRAY: 3287,
        Kind.CONST: 3226,
        Kind.DATASEC: 1,
        Kind.DECL_TAG: 314,
        Kind.ENUM: 2353,
        Kind.ENUM64: 22,
        Kind.FLOAT: 1,
        Kind.FUNC: 53265,
        Kind.FUNC_PROTO: 28292,
        Kind.FWD: 126,
        Kind.INT: 15,
        Kind.PTR: 14806,
        Kind.RESTRICT: 10,
        Kind.STRUCT: 10599,
        Kind.TYPEDEF: 2436,
        Kind.TYPE_TAG: 5,
        Kind.UNION: 1980,
        Kind.VAR: 424,
        Kind.VOLATILE: 22,
    }
    datasec = btf.type(53503)
    assert (datasec.kind, datasec.name, datasec.vlen) == (Kind.DATASEC, ".data..percpu", 424)
    tags = {tag.name for tag in btf.iter_types(Kind.DECL_TAG)}
    assert tags == {"bpf_kfunc", "bpf_fastcall"}
    last = btf.type(btf.type_count)
    assert (last.kind, last.name) == (Kind.FUNC, "zswpout_show")
    assert btf.enum_value("perf_event_state", "PERF_EVENT_STATE_REVOKED") == -4


# --------------------------------------------------------------------------- builder


@dataclass
class Builder:
    """Writes small BTF blobs by hand: one method per kind, each returns the new type id."""

    records: list[bytes] = field(default_factory=list)
    strings: bytearray = field(default_factory=lambda: bytearray(b"\0"))

    def s(self, name: str) -> int:
        if not name:
            return 0
        offset = len(self.strings)
        self.strings += name.encode() + b"\0"
        return offset

    def raw(
        self, name: str, kind: int, vlen: int, third: int, *extra: int, kflag: bool = False
    ) -> int:
        info = (int(kflag) << 31) | (kind << 24) | vlen
        words = (self.s(name), info, third, *extra)
        self.records.append(struct.pack(f"<{len(words)}I", *(w & 0xFFFFFFFF for w in words)))
        return len(self.records)

    def int_(self, name: str, size: int, bits: int | None = None, signed: bool = False) -> int:
        encoding = 1 if signed else 0
        return self.raw(name, Kind.INT, 0, size, (encoding << 24) | (bits or size * 8))

    def ref(self, kind: Kind, target: int, name: str = "") -> int:
        return self.raw(name, kind, 0, target)

    def array(self, elem: int, index: int, nelems: int) -> int:
        return self.raw("", Kind.ARRAY, 0, 0, elem, index, nelems)

    def struct(
        self,
        name: str,
        size: int,
        members: Iterable[tuple[str, int, int] | tuple[str, int, int, int]],
        *,
        union: bool = False,
        kflag: bool = False,
    ) -> int:
        words: list[int] = []
        count = 0
        for member in members:
            count += 1
            m_name, m_type, bit_offset = member[0], member[1], member[2]
            bitfield = member[3] if len(member) == 4 else 0
            words += [self.s(m_name), m_type, (bitfield << 24) | bit_offset]
        kind = Kind.UNION if union else Kind.STRUCT
        return self.raw(name, kind, count, size, *words, kflag=kflag)

    def enum(self, name: str, values: dict[str, int], size: int = 4, signed: bool = False) -> int:
        words = [w for key, value in values.items() for w in (self.s(key), value)]
        return self.raw(name, Kind.ENUM, len(values), size, *words, kflag=signed)

    def enum64(self, name: str, values: dict[str, int], signed: bool = False) -> int:
        words: list[int] = []
        for key, value in values.items():
            value &= (1 << 64) - 1
            words += [self.s(key), value & 0xFFFFFFFF, value >> 32]
        return self.raw(name, Kind.ENUM64, len(values), 8, *words, kflag=signed)

    def func_proto(self, ret: int, params: Iterable[tuple[str, int]]) -> int:
        words = [w for name, type_id in params for w in (self.s(name), type_id)]
        return self.raw("", Kind.FUNC_PROTO, len(words) // 2, ret, *words)

    def build(
        self,
        *,
        magic: int = 0xEB9F,
        version: int = 1,
        hdr_len: int = 24,
        type_len: int | None = None,
        str_off: int | None = None,
        str_len: int | None = None,
    ) -> bytes:
        types = b"".join(self.records)
        strings = bytes(self.strings)
        header = struct.pack(
            "<HBBIIIII",
            magic,
            version,
            0,
            hdr_len,
            0,
            len(types) if type_len is None else type_len,
            len(types) if str_off is None else str_off,
            len(strings) if str_len is None else str_len,
        )
        return header + b"\0" * (hdr_len - 24) + types + strings


def tiny() -> tuple[Builder, dict[str, int]]:
    """A little kernel-like universe: ints, a list_head, a task with anon members."""
    b = Builder()
    ids: dict[str, int] = {}
    ids["int"] = b.int_("int", 4, signed=True)
    ids["char"] = b.int_("char", 1)
    ids["ulong"] = b.int_("long unsigned int", 8)
    ids["pid_t"] = b.ref(Kind.TYPEDEF, ids["int"], "pid_t")
    ids["list_head_fwd"] = b.raw("list_head", Kind.FWD, 0, 0)
    ids["list_ptr"] = b.ref(Kind.PTR, ids["list_head_fwd"] + 2)  # forward reference
    ids["list_head"] = b.struct(
        "list_head", 16, [("next", ids["list_ptr"], 0), ("prev", ids["list_ptr"], 64)]
    )
    ids["comm"] = b.array(ids["char"], ids["int"], 16)
    ids["inner"] = b.struct("", 8, [("pid", ids["pid_t"], 0), ("tgid", ids["pid_t"], 32)])
    ids["anon_union"] = b.struct(
        "", 8, [("", ids["inner"], 0), ("both", ids["ulong"], 0)], union=True
    )
    ids["task_ptr"] = b.ref(Kind.PTR, ids["anon_union"] + 3)
    ids["const_task_ptr"] = b.ref(Kind.CONST, ids["task_ptr"])
    ids["task"] = b.struct(
        "task",
        64,
        [
            ("state", ids["int"], 0),
            ("flag_a", ids["int"], 32, 1),
            ("flag_b", ids["int"], 33, 3),
            ("", ids["anon_union"], 64),
            ("tasks", ids["list_head"], 128),
            ("comm", ids["comm"], 256),
            ("parent", ids["const_task_ptr"], 384),
        ],
        kflag=True,
    )
    assert ids["task"] == ids["task_ptr"] + 2 == ids["anon_union"] + 3
    return b, ids


def test_builder_universe() -> None:
    b, ids = tiny()
    btf = parse_btf(b.build())
    btf.validate()
    assert btf.type_count == len(b.records)
    assert btf.find_struct("list_head") == ids["list_head"]  # definition, not the FWD
    assert btf.member_offset("task", "pid") == 8
    assert btf.member_offset("task", "tgid") == 12
    assert btf.member_offset("task", "both") == 8
    assert btf.member_offset("task", "tasks.prev") == 24
    assert btf.member_offset("task", "comm") == 32
    assert btf.member_bit_offset("task", "flag_b") == (33, 3)
    assert btf.member_bit_offset("task", "state") == (0, 32)
    with pytest.raises(SymbolError, match="bitfield"):
        btf.member_offset("task", "flag_a")
    parent = btf.member_type("task", "parent")
    assert (parent.kind, parent.target_kind, parent.target_name) == (Kind.PTR, Kind.STRUCT, "task")
    assert parent.c_type == "struct task *const"
    assert btf.sizeof("task") == 64
    assert btf.sizeof("pid_t") == 4
    assert btf.sizeof(ids["comm"]) == 16
    assert btf.type_name(ids["comm"]) == "char[16]"
    assert btf.describe(ids["pid_t"]).name == "int"


def test_type_name_rendering() -> None:
    b = Builder()
    int_id = b.int_("int", 4, signed=True)
    char_id = b.int_("char", 1)
    const_char = b.ref(Kind.CONST, char_id)
    ptr_const_char = b.ref(Kind.PTR, const_char)
    proto = b.func_proto(int_id, [("a", ptr_const_char), ("", 0)])
    fn_ptr = b.ref(Kind.PTR, proto)
    arr = b.array(int_id, int_id, 4)
    ptr_arr = b.ref(Kind.PTR, arr)
    fwd_union = b.raw("u", Kind.FWD, 0, 0, kflag=True)
    volatile_void = b.ref(Kind.VOLATILE, 0)
    btf = Btf.parse(b.build())
    assert btf.type_name(ptr_const_char) == "const char *"
    assert btf.type_name(fn_ptr) == "int (*)(const char *, ...)"
    assert btf.type_name(ptr_arr) == "int (*)[4]"
    assert btf.type_name(fwd_union) == "union u"
    assert btf.type_name(volatile_void) == "volatile void"
    assert btf.sizeof(fn_ptr) == 8
    with pytest.raises(SymbolError, match="no size"):
        btf.sizeof(proto)


def test_old_style_int_bitfields() -> None:
    """Without kind_flag, a bitfield is a member whose INT type is narrower than its size."""
    b = Builder()
    three_bits = b.raw("unsigned int", Kind.INT, 0, 4, (5 << 16) | 3)  # offset 5, 3 bits
    int_id = b.int_("int", 4)
    b.struct("s", 8, [("x", three_bits, 32), ("y", int_id, 32)])
    btf = Btf.parse(b.build())
    assert btf.member_bit_offset("s", "x") == (37, 3)
    with pytest.raises(SymbolError, match="bitfield"):
        btf.member_offset("s", "x")
    assert btf.member_offset("s", "y") == 4


def test_enum_signedness() -> None:
    b = Builder()
    b.enum("flagged", {"NEG": -4, "POS": 7}, signed=True)
    b.enum("plain", {"BIG": 0xFFFFFFFF})
    b.enum64("wide", {"W_NEG": -2}, signed=True)
    b.enum64("uwide", {"W_BIG": 1 << 63})
    b.enum("dup1", {"SAME": 1, "DIFF": 1})
    b.enum("dup2", {"SAME": 1, "DIFF": 2})
    btf = Btf.parse(b.build())
    assert btf.enum_value("flagged", "NEG") == -4
    assert btf.enum_value("plain", "BIG") == 0xFFFFFFFF  # new encoder: no flag = unsigned
    assert btf.enum_value(None, "W_NEG") == -2
    assert btf.enum_value("uwide", "W_BIG") == 1 << 63
    assert btf.enum_value(None, "SAME") == 1
    with pytest.raises(SymbolError, match="ambiguous"):
        btf.enum_value(None, "DIFF")
    assert btf.sizeof("enum wide") == 8

    legacy = Builder()  # no flag and no ENUM64 anywhere: a pre-6.0 encoder, values are s32
    legacy.enum("old", {"MINUS_ONE": -1})
    assert Btf.parse(legacy.build()).enum_value("old", "MINUS_ONE") == -1


def test_all_kinds_decode() -> None:
    b = Builder()
    int_id = b.int_("int", 4, signed=True)
    proto = b.func_proto(int_id, [("x", int_id)])
    func = b.raw("f", Kind.FUNC, 1, proto)
    var = b.raw("v", Kind.VAR, 0, int_id, 1)
    sec = b.raw(".data", Kind.DATASEC, 1, 4, var, 0, 4)
    flt = b.raw("double", Kind.FLOAT, 0, 8)
    tag = b.raw("tag", Kind.DECL_TAG, 0, func, 0xFFFFFFFF)
    type_tag = b.ref(Kind.TYPE_TAG, int_id, "rcu")
    restrict = b.ref(Kind.RESTRICT, b.ref(Kind.PTR, type_tag))
    btf = Btf.parse(b.build())
    btf.validate()
    assert btf.type(func).linkage == 1
    assert btf.type(var).linkage == 1
    assert btf.type(sec).secinfos[0].type_id == var
    assert btf.type(flt).size == 8
    assert btf.type(tag).component_idx == -1
    assert btf.type(proto).params[0].name == "x"
    assert btf.sizeof("v") == 4
    assert btf.sizeof(restrict) == 8
    assert btf.describe(type_tag).kind == Kind.INT
    assert list(btf.func_names()) == ["f"]
    assert btf.type(0).kind == Kind.VOID


def test_find_struct_preferences() -> None:
    b = Builder()
    fwd = b.raw("thing", Kind.FWD, 0, 0)
    empty = b.struct("thing", 0, [])
    full = b.struct("thing", 4, [("x", b.int_("int", 4), 0)])
    only_fwd = b.raw("ghost", Kind.FWD, 0, 0)
    btf = Btf.parse(b.build())
    assert btf.find_struct("thing") == full
    assert btf.ids_by_name("thing") == (fwd, empty, full)
    with pytest.raises(SymbolError, match="only forward-declared"):
        btf.find_struct("ghost")
    with pytest.raises(SymbolError, match="not a struct"):
        btf.member_offset(only_fwd, "x")
    with pytest.raises(SymbolError, match="not found"):
        btf.find_struct("union thing")


# --------------------------------------------------------------------------- cycles


def test_typedef_cycle_is_reported_not_followed_forever() -> None:
    b = Builder()
    a = b.ref(Kind.TYPEDEF, 2, "A")
    b.ref(Kind.TYPEDEF, a, "B")
    holder = b.struct("holder", 8, [("x", a, 0)])
    btf = Btf.parse(b.build())
    btf.validate()  # structurally fine; the cycle shows when resolved
    with pytest.raises(GuestFormatError, match="cycle"):
        btf.sizeof("A")
    with pytest.raises(GuestFormatError, match="cycle"):
        btf.member_type("holder", "x")
    with pytest.raises(GuestFormatError, match="cycle"):
        btf.member_offset("holder", "x.y")
    with pytest.raises(GuestFormatError, match="cycle"):
        btf.member_bit_offset(holder, "x")
    assert "..." in btf.type_name(a) or "A" in btf.type_name(a)


def test_array_and_const_self_reference() -> None:
    b = Builder()
    arr = b.array(1, 1, 4)  # an array of itself
    const = b.ref(Kind.CONST, 2)  # const of itself
    ptr = b.ref(Kind.PTR, 3)  # pointer to itself: legal, sized, nothing to follow
    btf = Btf.parse(b.build())
    with pytest.raises(GuestFormatError, match="cycle"):
        btf.sizeof(arr)
    with pytest.raises(GuestFormatError, match="cycle"):
        btf.describe(const)
    assert btf.sizeof(ptr) == 8
    assert btf.type_name(ptr).count("*") > 10  # bounded, not infinite


def test_long_chain_is_cut() -> None:
    b = Builder()
    current = b.int_("int", 4)
    for i in range(MAX_CHAIN + 5):
        current = b.ref(Kind.TYPEDEF, current, f"t{i}")
    btf = Btf.parse(b.build())
    with pytest.raises(GuestFormatError, match="longer than"):
        btf.sizeof(current)
    assert btf.sizeof("t3") == 4


def test_anonymous_member_cycles_and_fan_out() -> None:
    b = Builder()
    int_id = b.int_("int", 4)
    # A struct whose anonymous member is itself.
    b.struct("loop", 4, [("", 2, 0), ("x", int_id, 0)])
    # Twenty levels, each with 200 anonymous members of the next level: 200**20 paths if
    # searched naively, linear with the shared visited set.
    first = len(b.records) + 1
    for level in range(20):
        members = [("", first + level + 1, 0)] * 200 if level < 19 else [("leaf", int_id, 0)]
        b.struct(f"level{level}", 4, members)
    btf = Btf.parse(b.build())
    assert btf.member_offset("loop", "x") == 0
    with pytest.raises(SymbolError, match="no member"):
        btf.member_offset("loop", "nope")
    start = time.perf_counter()
    with pytest.raises(SymbolError, match="no member"):
        btf.member_offset("level0", "absent")
    assert btf.member_offset("level0", "leaf") == 0
    assert time.perf_counter() - start < 1.0


def test_anonymous_nesting_is_bounded() -> None:
    b = Builder()
    int_id = b.int_("int", 4)
    for level in range(MAX_NESTING + 5):
        b.struct(f"level{level}", 4, [("", level + 3, 0)] if level < MAX_NESTING + 4 else [])
    btf = Btf.parse(b.build())
    with pytest.raises(GuestFormatError, match="nested deeper"):
        btf.member_offset("level0", "leaf")
    assert btf.sizeof(int_id) == 4


def test_huge_array_size() -> None:
    b = Builder()
    int_id = b.int_("int", 4)
    current = int_id
    for _ in range(10):
        current = b.array(current, int_id, 0xFFFFFFFF)
    btf = Btf.parse(b.build())
    with pytest.raises(GuestFormatError, match="overflows"):
        btf.sizeof(current)


# --------------------------------------------------------------------------- bad blobs


def good_tiny() -> bytes:
    b, _ = tiny()
    return b.build()


def with_header(blob: bytes, **fields: int) -> bytes:
    names = ("magic", "version", "flags", "hdr_len", "type_off", "type_len", "str_off", "str_len")
    values = dict(zip(names, struct.unpack_from("<HBBIIIII", blob), strict=True))
    values.update(fields)
    return struct.pack("<HBBIIIII", *values.values()) + blob[24:]


@pytest.mark.parametrize(
    ("blob", "message"),
    [
        (b"", "shorter than"),
        (b"\x9f\xeb\x01\x00", "shorter than"),
        (b"\x7fELF" + b"\0" * 60, "bad BTF magic"),
        (with_header(good_tiny(), magic=0x9FEB), "big-endian"),
        (with_header(good_tiny(), version=2), "version 2"),
        (with_header(good_tiny(), hdr_len=8), "header length 8"),
        (with_header(good_tiny(), hdr_len=1 << 31), "header length"),
        (with_header(good_tiny(), type_len=0xFFFFFFFC), "type section"),
        (with_header(good_tiny(), type_off=0xFFFFFFF0), "type section"),
        (with_header(good_tiny(), str_len=0xFFFFFFFF), "string section"),
        (with_header(good_tiny(), str_off=0), "overlaps"),
        (with_header(good_tiny(), str_len=0), "string section is empty"),
        (with_header(good_tiny(), type_off=2, type_len=4), "multiple of 4"),
        (
            b"\x9f\xeb\x01\x00\x18\x00\x00\x00"
            + struct.pack("<IIII", 0, 0x7FFFFFFC, 0, 1)
            + b"\0" * 76,
            "type section",
        ),
    ],
)
def test_bad_headers(blob: bytes, message: str) -> None:
    with pytest.raises(GuestFormatError, match=message):
        Btf.parse(blob)


def test_bad_sections_and_records() -> None:
    b = Builder()
    b.int_("int", 4)
    good = b.build()
    type_len = len(b.records[0])
    # Strings must start and end with NUL.
    with pytest.raises(GuestFormatError, match="does not end with NUL"):
        Btf.parse(good[:-1] + b"x")
    with pytest.raises(GuestFormatError, match="does not start with NUL"):
        Btf.parse(good[: 24 + type_len] + b"x" + good[24 + type_len + 1 :])
    # A record cut short, an unknown kind, a vlen running past the section.
    with pytest.raises(GuestFormatError, match="truncated"):
        Btf.parse(Builder(records=[b"\0" * 8]).build())
    with pytest.raises(GuestFormatError, match="unknown kind 25"):
        Btf.parse(Builder(records=[struct.pack("<III", 0, 25 << 24, 0)]).build())
    with pytest.raises(GuestFormatError, match="unknown kind 0"):
        Btf.parse(Builder(records=[struct.pack("<III", 0, 0, 0)]).build())
    with pytest.raises(GuestFormatError, match=r"type id 1 at byte 24 \(STRUCT, vlen 65535\)"):
        Btf.parse(Builder(records=[struct.pack("<III", 0, (4 << 24) | 0xFFFF, 0)]).build())


def test_bad_contents_found_lazily_and_by_validate() -> None:
    cases: list[tuple[Callable[[Builder], int], str]] = [
        (lambda b: b.raw("", Kind.PTR, 0, 99), "refers to type id 99"),
        (lambda b: b.struct("s", 4, [("x", 77, 0)]), "refers to type id 77"),
        (lambda b: b.raw("", Kind.INT, 0, 3, 8), "invalid size 3"),
        (lambda b: b.raw("", Kind.INT, 0, 4, 33), "invalid encoding"),
        (lambda b: b.raw("", Kind.INT, 0, 4, 3 << 24 | 32), "invalid encoding"),
        (lambda b: b.raw("", Kind.ENUM, 0, 3), "invalid size 3"),
        (lambda b: b.array(1, 1234, 2), "refers to type id 1234"),
        (lambda b: b.func_proto(0, [("p", 555)]), "refers to type id 555"),
        (lambda b: b.raw("d", Kind.DATASEC, 1, 4, 444, 0, 4), "refers to type id 444"),
    ]
    for make, message in cases:
        b = Builder()
        bad = make(b)
        btf = Btf.parse(b.build())
        with pytest.raises(GuestFormatError, match=message):
            btf.validate()
        with pytest.raises(GuestFormatError, match=message):
            btf.type(bad)


def test_bad_names() -> None:
    b = Builder()
    b.records.append(struct.pack("<III", 4096, Kind.INT << 24, 4) + struct.pack("<I", 32))
    btf = Btf.parse(b.build())
    with pytest.raises(GuestFormatError, match="name offset 4096 of type id 1"):
        btf.name_of(1)
    with pytest.raises(GuestFormatError, match="name offset 4096"):
        btf.find_struct("anything")

    long = Builder()
    long.int_("x" * 600, 4)
    btf = Btf.parse(long.build())
    with pytest.raises(GuestFormatError, match="longer than 512"):
        btf.validate()

    odd = Builder()
    odd.struct("cafX", 0, [])
    odd.strings = bytearray(bytes(odd.strings).replace(b"cafX", b"caf\xff"))
    not_utf8 = Btf.parse(odd.build())  # not UTF-8 on the wire: still a name, escaped
    assert not_utf8.name_of(1) == "caf\\xff"
    assert not_utf8.find_struct("caf\\xff") == 1


def test_overlapping_name_offsets_cannot_blow_up_memory() -> None:
    """Names at every byte of long strings would be ~256x the blob as text: refused."""
    b = Builder()
    b.strings = bytearray(b"\0" + (b"a" * 511 + b"\0") * 2048)  # 1 MiB of strings
    for i in range(30000):
        name_off = 1 + (i // 511) * 512 + i % 511  # every byte offset inside the runs
        b.records.append(struct.pack("<IIII", name_off, Kind.INT << 24, 4, 32))
    btf = Btf.parse(b.build())
    with pytest.raises(GuestFormatError, match="overlapping string offsets"):
        btf.find_struct("a")


def test_empty_type_section() -> None:
    btf = Btf.parse(Builder().build())
    assert btf.type_count == 0
    btf.validate()
    with pytest.raises(SymbolError):
        btf.find_struct("task_struct")
    with pytest.raises(GuestFormatError, match="out of range"):
        btf.type(1)
    assert list(btf.func_names()) == []


def test_input_buffer_is_copied() -> None:
    blob = bytearray(good_tiny())
    btf = Btf.parse(blob)
    blob[24:] = b"\xff" * (len(blob) - 24)
    assert btf.member_offset("task", "comm") == 32


# --------------------------------------------------------------------------- fuzzing


def type_record_words(blob: bytes) -> list[int]:
    """Byte offsets of each record of a valid blob (independent re-walk for the tests)."""
    _, _, _, hdr_len, type_off, type_len, _, _ = struct.unpack_from("<HBBIIIII", blob)
    fixed = {1: 1, 3: 3, 14: 1, 17: 1}
    per_vlen = {4: 3, 5: 3, 6: 2, 13: 2, 15: 3, 19: 3}
    starts = []
    at = hdr_len + type_off
    end = at + type_len
    while at < end:
        starts.append(at)
        (info,) = struct.unpack_from("<I", blob, at + 4)
        kind, vlen = (info >> 24) & 0x1F, info & 0xFFFF
        at += 4 * (3 + fixed.get(kind, 0) + vlen * per_vlen.get(kind, 0))
    return starts


MINI_TYPES = 620  # 6.12's first 620 types: task_struct (id 112) and its members' types


@cache
def mini_real_blob() -> bytes:
    """The first MINI_TYPES records of 6.12's BTF with its whole string section.

    Small enough to parse and walk in milliseconds per fuzz example, real enough to hold
    task_struct, list_head and their typedef/const/array chains. References past the cut
    are out of range: a realistic defect for the parser to meet.
    """
    blob = real_blob("6.12")
    _, _, _, hdr_len, type_off, _, str_off, str_len = struct.unpack_from("<HBBIIIII", blob)
    starts = type_record_words(blob)
    types = blob[hdr_len + type_off : starts[MINI_TYPES]]
    strings = blob[hdr_len + str_off : hdr_len + str_off + str_len]
    header = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(types), len(types), len(strings))
    return header + types + strings


LOOKUP_NAMES = ("task_struct", "list_head", "pid_t", "atomic_t", "char", "int", "x", "")


def exercise(btf: Btf, extra_names: Iterable[str] = ()) -> None:
    """Call every lookup on a (possibly hostile) parsed blob; only our errors may escape."""

    def attempt(fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except (GuestFormatError, SymbolError):
            return None

    validated = _validate_ok(btf)
    limit = min(btf.type_count, MINI_TYPES + 10)
    for type_id in range(limit + 2):
        decoded = attempt(btf.type, type_id)
        if validated and type_id <= btf.type_count:
            assert decoded is not None, f"validate() passed but type {type_id} fails"
        attempt(btf.sizeof, type_id)
        attempt(btf.describe, type_id)
        attempt(btf.type_name, type_id)
        attempt(btf.name_of, type_id)
        if decoded is not None and decoded.kind in (Kind.STRUCT, Kind.UNION):
            for member in decoded.members[:8]:
                attempt(btf.member_offset, type_id, member.name)
                attempt(btf.member_bit_offset, type_id, member.name)
                attempt(btf.member_type, type_id, member.name)
                attempt(btf.member_offset, type_id, f"{member.name}.counter")
    for name in (*LOOKUP_NAMES, *extra_names):
        attempt(btf.find_struct, name)
        attempt(btf.find_type, name)
        attempt(btf.sizeof, name)
        attempt(btf.sizeof, f"{name} *")
        attempt(btf.member_offset, name, "comm")
        attempt(btf.member_offset, name, "se.vruntime")
        attempt(btf.member_type, name, "real_parent")
        attempt(btf.enum_value, None, name)
        attempt(btf.enum_value, name, "A")
        attempt(btf.ids_by_name, name)
    attempt(lambda: sum(1 for _ in btf.func_names()))


def _validate_ok(btf: Btf) -> bool:
    try:
        btf.validate()
    except GuestFormatError:
        return False
    return True


def parse_or_reject(blob: bytes) -> Btf | None:
    try:
        return Btf.parse(blob)
    except GuestFormatError:
        return None


FUZZ = settings(
    max_examples=60,
    deadline=timedelta(seconds=3),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def test_mini_real_blob_is_sound() -> None:
    btf = Btf.parse(mini_real_blob())
    assert btf.type_count == MINI_TYPES
    assert btf.find_struct("task_struct") == 112
    assert btf.member_offset("list_head", "prev") == 8
    with pytest.raises(GuestFormatError, match="out of range"):
        btf.validate()  # references beyond the cut
    exercise(btf)


@FUZZ
@given(st.binary(max_size=600))
def test_fuzz_random_bytes(data: bytes) -> None:
    btf = parse_or_reject(data)
    if btf is not None:
        exercise(btf)


FUZZ_NAMES = ("a", "b", "task_struct", "x", "comm")
FUZZ_STRINGS = b"\0" + b"\0".join(name.encode() for name in FUZZ_NAMES) + b"\0"
FUZZ_NAME_OFFSETS = [0] + [FUZZ_STRINGS.index(b"\0" + n.encode() + b"\0") + 1 for n in FUZZ_NAMES]
RECORD_WORDS = {1: (1, 0), 3: (3, 0), 4: (0, 3), 5: (0, 3), 6: (0, 2), 13: (0, 2)}
RECORD_WORDS |= {14: (1, 0), 15: (0, 3), 17: (1, 0), 19: (0, 3)}


@st.composite
def type_sections(draw: st.DrawFn) -> bytes:
    """Well-framed records of every kind whose words are small ids, sizes and names.

    Framing right means most blobs get past :meth:`Btf.parse`, so the decoders and the
    resolvers meet the interesting defects: self references, cycles, ids one past the
    end, odd INT encodings, bitfield flags on anything.
    """
    count = draw(st.integers(1, 14))
    word = st.one_of(
        st.integers(0, count + 1),
        st.sampled_from([4, 8, 16, 32, 64, (1 << 24) | 32, (1 << 24) | 3, 0xFFFFFFFF]),
        st.sampled_from(FUZZ_NAME_OFFSETS),
    )
    words: list[int] = []
    for _ in range(count):
        kind = draw(st.integers(1, 19))
        vlen = draw(st.integers(0, 3))
        kflag = draw(st.booleans())
        fixed, per_vlen = RECORD_WORDS.get(kind, (0, 0))
        words.append(draw(st.sampled_from(FUZZ_NAME_OFFSETS)))
        words.append((int(kflag) << 31) | (kind << 24) | vlen)
        words.append(draw(word))
        words += draw(
            st.lists(word, min_size=fixed + vlen * per_vlen, max_size=fixed + vlen * per_vlen)
        )
    return struct.pack(f"<{len(words)}I", *words)


@FUZZ
@given(type_sections())
def test_fuzz_structured_records(types: bytes) -> None:
    header = struct.pack(
        "<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(types), len(types), len(FUZZ_STRINGS)
    )
    btf = Btf.parse(header + types + FUZZ_STRINGS)  # framing is right: parse must succeed
    exercise(btf, FUZZ_NAMES)


@FUZZ
@given(st.lists(st.tuples(st.integers(0, 10**9), st.integers(0, 255)), min_size=1, max_size=8))
def test_fuzz_real_blob_byte_flips(flips: list[tuple[int, int]]) -> None:
    blob = bytearray(mini_real_blob())
    type_end = 24 + struct.unpack_from("<I", blob, 12)[0]
    for position, value in flips:
        # Mostly hit the header and the type records, sometimes the strings.
        where = position % (type_end if position % 4 else len(blob))
        blob[where] = value
    btf = parse_or_reject(bytes(blob))
    if btf is not None:
        exercise(btf)


@FUZZ
@given(
    st.integers(0, MINI_TYPES - 1),
    st.integers(0, 5),
    st.one_of(
        st.sampled_from([0, 1, 112, 113, MINI_TYPES, MINI_TYPES + 1, 0xFFFF, 0xFFFFFFFF]),
        st.integers(0, 0xFFFFFFFF),
    ),
)
def test_fuzz_real_blob_field_overwrite(type_index: int, word: int, value: int) -> None:
    """Overwrite one word of one real record: refs become self-references, counts huge."""
    blob = bytearray(mini_real_blob())
    start = type_record_words(bytes(blob))[type_index]
    if value == 0xFFFF:  # keep the record's kind, max out its vlen
        (info,) = struct.unpack_from("<I", blob, start + 4)
        struct.pack_into("<I", blob, start + 4, info | 0xFFFF)
    else:
        if value == 113:
            value = type_index + 1  # point the record at itself
        position = start + 4 * word
        if position + 4 <= len(blob):
            struct.pack_into("<I", blob, position, value)
    btf = parse_or_reject(bytes(blob))
    if btf is not None:
        exercise(btf)


@FUZZ
@given(st.sampled_from(range(8)), st.integers(0, 0xFFFFFFFF))
def test_fuzz_header_fields(field_index: int, value: int) -> None:
    blob = bytearray(mini_real_blob())
    formats = "HBBIIIII"
    offset = struct.calcsize("<" + formats[:field_index])
    code = formats[field_index]
    struct.pack_into("<" + code, blob, offset, value % (1 << (8 * struct.calcsize(code))))
    btf = parse_or_reject(bytes(blob))
    if btf is not None:
        exercise(btf)


@settings(max_examples=25, deadline=timedelta(seconds=5))
@given(st.integers(0, 10**9), st.booleans())
def test_fuzz_truncated_real_blobs(cut: int, fix_header: bool) -> None:
    """A truncated blob fails fast; with the header shortened too it may parse partially."""
    blob = real_blob("6.12")
    type_len = struct.unpack_from("<I", blob, 12)[0]
    if not fix_header:
        with pytest.raises(GuestFormatError):
            Btf.parse(blob[: cut % len(blob)])
        return
    new_type_len = cut % type_len
    patched = with_header(blob, type_len=new_type_len)
    btf = parse_or_reject(patched)
    if btf is None:
        return
    assert btf.type_count <= EXPECTED["6.12"].type_count
    for name in ("task_struct", "list_head"):
        with contextlib.suppress(GuestFormatError, SymbolError):
            btf.member_offset(name, "next" if name == "list_head" else "comm")


def test_self_referencing_typedefs_in_real_blob() -> None:
    """Point two real typedefs at each other: lookups through them report a cycle."""
    blob = bytearray(mini_real_blob())
    btf = Btf.parse(bytes(blob))
    pid_t = btf.find_type("pid_t")
    typedefs = [t.type_id for t in btf.iter_types(Kind.TYPEDEF) if t.type_id != pid_t]
    other = typedefs[0]
    starts = type_record_words(bytes(blob))
    struct.pack_into("<I", blob, starts[pid_t - 1] + 8, other)
    struct.pack_into("<I", blob, starts[other - 1] + 8, pid_t)
    bad = Btf.parse(bytes(blob))
    with pytest.raises(GuestFormatError, match="cycle"):
        bad.sizeof("pid_t")
    with pytest.raises(GuestFormatError, match="cycle"):
        bad.member_bit_offset("task_struct", "pid")
    assert (
        bad.member_offset("task_struct", "pid") == EXPECTED["6.12"].offsets[("task_struct", "pid")]
    )
