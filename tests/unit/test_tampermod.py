"""Tests of the tamper module generator against the three cached kernel builds.

The generated ``.ko`` is read back with a small ELF reader written here (standard library
only, independent of the generator's own), and its init code is disassembled with capstone
and its stores are followed, so these tests check what the module loader and the CPU will
see: the vermagic and ``module_layout`` CRC of the real Debian module of that build, a
``struct module`` of the right size with the name and the relocated ``init`` pointer at
their offsets, no undefined symbol, and code that writes exactly the requested bytes with
``CR0.WP`` cleared and interrupts off. Loading it in a guest is
tests/integration/test_tampermod.py. The kernels come from ``make setup``; a missing one
fails the test.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import capstone
import pytest
from capstone import x86

from vmshield.errors import LabError
from vmshield.lab.tampermod import (
    ENDBR64,
    MAX_DATA,
    build_tamper_module,
    compile_init,
    kernel_template,
)
from vmshield.paths import kernels_dir

KERNELS = ("5.10", "6.1", "6.12", "7.3")
REAL_KERNELS = kernels_dir()

# Read from the cached crc-itu-t.ko files and BTF while writing the plan (section 7);
# kept literal here so a generator reading the wrong field cannot agree with itself.
# Debian's 7.3 is built without MODVERSIONS: its modules have no __versions at all.
MODULE_LAYOUT_CRC = {"5.10": 0x921BC7A2, "6.1": 0x82164FBB, "6.12": 0x2F9B2B9A, "7.3": None}
SIZEOF_MODULE = {"5.10": 960, "6.1": 896, "6.12": 1280, "7.3": 1280}
INIT_OFFSET = {"5.10": 0x150, "6.1": 0x138, "6.12": 0x138, "7.3": 0x130}
NAME_OFFSET = 0x18

TEXT_ADDR = 0xFFFF_FFFF_8100_0000  # kernel image: fits a sign-extended disp32
VMALLOC_ADDR = 0xFFFF_C900_0000_1000  # module / vmalloc space: needs a 64-bit constant


@dataclass(frozen=True)
class Section:
    name: str
    type: int
    flags: int
    link: int
    info: int
    data: bytes


@dataclass(frozen=True)
class Sym:
    name: str
    info: int
    shndx: int
    value: int


def read_elf(blob: bytes) -> list[Section]:
    """Sections of a little-endian ELF64 relocatable for x86-64 (header fields checked)."""
    assert blob[:4] == b"\x7fELF" and blob[4] == 2 and blob[5] == 1, "not ELF64 LE"
    e_type, e_machine = struct.unpack_from("<HH", blob, 16)
    assert (e_type, e_machine) == (1, 62), "not an x86-64 relocatable"
    (shoff,) = struct.unpack_from("<Q", blob, 0x28)
    ehsize, _, _, shentsize, shnum, shstrndx = struct.unpack_from("<HHHHHH", blob, 0x34)
    assert ehsize == 64 and shentsize == 64 and shoff + 64 * shnum <= len(blob)
    raw = [struct.unpack_from("<IIQQQQIIQQ", blob, shoff + 64 * i) for i in range(shnum)]
    names = blob[raw[shstrndx][4] : raw[shstrndx][4] + raw[shstrndx][5]]
    out = []
    for name, typ, flags, _addr, off, size, link, info, _align, _entsize in raw:
        assert typ == 8 or off + size <= len(blob), "section past the end of the file"
        text = names[name : names.index(b"\0", name)].decode()
        out.append(Section(text, typ, flags, link, info, blob[off : off + size]))
    return out


def one(sections: list[Section], name: str) -> Section:
    found = [s for s in sections if s.name == name]
    assert len(found) == 1, f"{len(found)} sections named {name}"
    return found[0]


def symbols(sections: list[Section]) -> list[Sym]:
    (symtab,) = [s for s in sections if s.type == 2]  # exactly one SHT_SYMTAB
    strtab = sections[symtab.link].data
    out = []
    for at in range(0, len(symtab.data), 24):
        name, info, _other, shndx, value, _size = struct.unpack_from("<IBBHQQ", symtab.data, at)
        out.append(Sym(strtab[name : strtab.index(b"\0", name)].decode(), info, shndx, value))
    return out


def modinfo(sections: list[Section]) -> dict[str, str]:
    items = [i.decode() for i in one(sections, ".modinfo").data.split(b"\0") if i]
    return dict(i.split("=", 1) for i in items)


@cache
def template_vermagic(version: str) -> str:
    """The vermagic of the real module, read straight from its .modinfo."""
    path = REAL_KERNELS / version / "modules" / "crc-itu-t.ko"
    if not path.is_file():
        pytest.fail(f"{path} is missing: run `make setup`", pytrace=False)
    return modinfo(read_elf(path.read_bytes()))["vermagic"]


def stores(code: bytes) -> tuple[list[str], list[tuple[int, int]]]:
    """The mnemonics up to the first ``ret`` (the path taken with CR4.CET off) and the byte
    stores on it as (address, value), following 64-bit constants loaded into registers."""
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    md.detail = True
    regs: dict[int, int] = {}
    mnemonics: list[str] = []
    out: list[tuple[int, int]] = []
    for insn in md.disasm(code, 0):
        text = f"{insn.mnemonic} {insn.op_str}".strip()
        mnemonics.append(text)
        ops = insn.operands
        if insn.mnemonic in ("mov", "movabs") and ops[0].type == x86.X86_OP_REG:
            if ops[1].type == x86.X86_OP_IMM:
                regs[ops[0].reg] = ops[1].imm & (1 << 64) - 1
            else:
                regs.pop(ops[0].reg, None)
        if text.startswith("mov byte ptr ["):
            mem = ops[0].mem
            assert mem.index == 0 and ops[1].type == x86.X86_OP_IMM
            base = regs[mem.base] if mem.base else 0
            out.append(((base + mem.disp) & (1 << 64) - 1, ops[1].imm & 0xFF))
        if insn.mnemonic == "ret":
            break
    return mnemonics, out


# --------------------------------------------------------------------------- the module


@pytest.mark.parametrize("version", KERNELS)
def test_module_carries_what_the_loader_checks(version: str) -> None:
    data = b"\x0f\x0b\xcc\x90"
    ko = build_tamper_module(version, TEXT_ADDR, data)
    sections = read_elf(ko)

    info = modinfo(sections)
    assert info["vermagic"] == template_vermagic(version)
    release = (REAL_KERNELS / version / "release").read_text().strip()
    assert info["vermagic"].startswith(release + " ")
    assert info["name"] == "vms_tamper" and info["license"] == "GPL"

    if MODULE_LAYOUT_CRC[version] is None:
        assert not [s for s in sections if s.name == "__versions"]
    else:
        versions = one(sections, "__versions").data
        assert len(versions) == 64  # one modversion_info: module_layout, nothing imported
        crc, name = struct.unpack("<Q56s", versions)
        assert name.rstrip(b"\0") == b"module_layout"
        assert crc == MODULE_LAYOUT_CRC[version]

    this = one(sections, ".gnu.linkonce.this_module")
    assert this.flags & 0x3 == 0x3  # SHF_WRITE | SHF_ALLOC
    assert len(this.data) == SIZEOF_MODULE[version]
    assert this.data[NAME_OFFSET : NAME_OFFSET + 11] == b"vms_tamper\0"
    assert this.data.count(0) == len(this.data) - len(b"vms_tamper")

    syms = symbols(sections)
    assert all(s.shndx != 0 for s in syms[1:]), "the module must import nothing"
    rela = one(sections, ".rela.gnu.linkonce.this_module")
    assert sections[rela.info] is this and sections[rela.link].type == 2
    assert len(rela.data) == 24
    offset, rinfo, addend = struct.unpack("<QQq", rela.data)
    assert (offset, rinfo & 0xFFFFFFFF, addend) == (INIT_OFFSET[version], 1, 0)  # R_X86_64_64
    assert this.data[offset : offset + 8] == bytes(8)  # the loader insists on a zero target
    target = syms[rinfo >> 32]
    init = sections[target.shndx]
    assert init.name == ".init.text" and init.flags & 0x6 == 0x6  # SHF_ALLOC | SHF_EXECINSTR
    assert init.data[target.value :].startswith(ENDBR64)  # do_one_initcall calls it indirectly

    _, writes = stores(init.data[target.value :])
    assert writes == [(TEXT_ADDR + i, b) for i, b in enumerate(data)]


@pytest.mark.parametrize("address", [TEXT_ADDR, VMALLOC_ADDR, (1 << 64) - MAX_DATA])
def test_init_code_writes_exactly_the_bytes_with_wp_clear(address: int) -> None:
    data = bytes(range(0x41, 0x41 + 37))
    mnemonics, writes = stores(compile_init(address, data))
    assert writes == [(address + i, b) for i, b in enumerate(data)]
    assert mnemonics[0] == "endbr64"
    assert mnemonics[-3:] == ["sti", "mov eax, 0xffffffed", "ret"]  # -ENODEV
    cr0 = [i for i, m in enumerate(mnemonics) if m.startswith("mov cr0,")]
    at_store = [i for i, m in enumerate(mnemonics) if m.startswith("mov byte ptr")]
    assert mnemonics.count("cli") == 1 and mnemonics.count("sti") == 1
    assert mnemonics.index("cli") < cr0[0] < at_store[0]
    assert len(cr0) == 2 and at_store[-1] < cr0[1] < mnemonics.index("sti")
    assert any("0xfffffffffffeffff" in m for m in mnemonics[: cr0[0]])  # ~CR0.WP


def test_largest_write_and_a_release_string() -> None:
    template = kernel_template("6.12")
    release = (REAL_KERNELS / "6.12" / "release").read_text().strip()
    assert kernel_template(release) is template  # what Kernel.release reports works too
    data = bytes(range(256))
    ko = build_tamper_module(release, VMALLOC_ADDR, data, name="x" * 55)
    assert ko == build_tamper_module("6.12", VMALLOC_ADDR, data, name="x" * 55)
    init = one(read_elf(ko), ".init.text")
    assert stores(init.data)[1] == [(VMALLOC_ADDR + i, b) for i, b in enumerate(data)]


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "address,data,name",
    [
        (0x0000_7FFF_FFFF_F000, b"\x90", "vms_tamper"),  # user space
        (0x0000_8000_0000_0000, b"\x90", "vms_tamper"),  # non-canonical
        (0xFEFF_FFFF_FFFF_FFFF, b"\x90", "vms_tamper"),  # just below the kernel half
        ((1 << 64) - 2, b"\x90" * 3, "vms_tamper"),  # wraps past the top
        (-1, b"\x90", "vms_tamper"),
        (TEXT_ADDR, b"", "vms_tamper"),
        (TEXT_ADDR, b"\x90" * (MAX_DATA + 1), "vms_tamper"),
        (TEXT_ADDR, b"\x90", ""),
        (TEXT_ADDR, b"\x90", "bad-name"),
        (TEXT_ADDR, b"\x90", "x" * 56),  # MODULE_NAME_LEN with its NUL
        (TEXT_ADDR, b"\x90", "evil\0name"),
    ],
)
def test_rejects_bad_arguments(address: int, data: bytes, name: str) -> None:
    with pytest.raises(ValueError):
        build_tamper_module("6.12", address, data, name)


@pytest.mark.parametrize("version", ["../6.12", "6.12/..", "", "6.12\n"])
def test_rejects_paths_as_versions(version: str) -> None:
    with pytest.raises(ValueError, match="not a cache folder name"):
        build_tamper_module(version, TEXT_ADDR, b"\x90")


def test_unknown_kernel_names_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(LabError, match="make setup"):
        build_tamper_module("9.9", TEXT_ADDR, b"\x90")
    monkeypatch.setenv("VMSHIELD_CACHE", str(tmp_path))
    (tmp_path / "kernels" / "6.12").mkdir(parents=True)  # cached, but without its files
    with pytest.raises(LabError, match="missing"):
        build_tamper_module("6.12", TEXT_ADDR, b"\x90")
