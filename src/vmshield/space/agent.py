"""Building the agent (gcc) and relocating it for the address the guest gave us.

The agent is freestanding C (``agent.c`` beside this module, shipped as package data)
compiled to one relocatable object; the header it includes is generated from
:mod:`vmshield.space.layout`. Objects are cached by the hash of source, header and
flags. Loading lays out its allocated sections from a base address and applies the
x86-64 relocations itself: symbols the object defines resolve inside the image,
``vms_config`` to the config page, everything else to the guest kernel's kallsyms, so
the agent calls kernel helpers with plain
direct calls. Only the relocation types gcc emits for ``-mcmodel=kernel`` are accepted.
"""

from __future__ import annotations

import hashlib
import os
import struct
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

from elftools.elf.elffile import ELFFile
from elftools.elf.relocation import RelocationSection
from elftools.elf.sections import SymbolTableSection

from vmshield.errors import VmshieldError
from vmshield.paths import cache_dir
from vmshield.space import layout

CFLAGS = (
    "-O2", "-ffreestanding", "-fno-builtin", "-fno-tree-loop-distribute-patterns",
    "-fno-pic", "-mcmodel=kernel", "-mno-red-zone", "-mgeneral-regs-only",
    "-fno-stack-protector", "-fno-jump-tables", "-fcf-protection=none",
    "-fno-omit-frame-pointer", "-mpreferred-stack-boundary=3",
    "-fno-asynchronous-unwind-tables", "-fno-common", "-nostdlib", "-Wall", "-Wextra",
    "-Werror",
)  # fmt: skip
R_X86_64_64, R_X86_64_PC32, R_X86_64_32, R_X86_64_32S, R_X86_64_PLT32 = 1, 2, 10, 11, 4
CONFIG_SYMBOL = "vms_config"
GATE_SYMBOL = "vms_gate"
ENTRY_SYMBOL = "vms_agent"
SHF_WRITE, SHF_ALLOC, SHF_EXECINSTR = 1, 2, 4


class AgentError(VmshieldError):
    """The agent could not be built or relocated."""


def source_path() -> Path:
    env = os.environ.get("VMSHIELD_AGENT_SOURCE")
    if env:
        return Path(env)
    return Path(__file__).resolve().with_name("agent.c")


def build(source: Path | None = None, out_dir: Path | None = None) -> Path:
    """Compile the agent (once per source/header/flags hash) and return the object."""
    src = source or source_path()
    if not src.is_file():
        raise AgentError(f"agent source not found at {src} (set VMSHIELD_AGENT_SOURCE)")
    header = layout.c_header()
    tag = hashlib.sha256(src.read_bytes() + header.encode() + " ".join(CFLAGS).encode())
    d = (out_dir or cache_dir() / "agent") / tag.hexdigest()[:16]
    obj = d / "agent.o"
    if obj.is_file():
        return obj
    d.mkdir(parents=True, exist_ok=True)
    (d / "layout.h").write_text(header)
    tmp = d / f"agent.o.{os.getpid()}"
    res = subprocess.run(
        ["gcc", *CFLAGS, f"-I{d}", "-c", str(src), "-o", str(tmp)],
        capture_output=True,
        text=True,
    )
    if res.returncode:
        raise AgentError(f"gcc failed on {src}:\n{res.stderr}")
    tmp.replace(obj)
    return obj


@dataclass(frozen=True)
class Image:
    """The agent laid out at ``base``: bytes to write and where its entry points are."""

    base: int
    code: bytes
    symbols: dict[str, int]  # defined symbols -> absolute address
    imports: dict[str, int]  # kernel symbols it calls -> address

    @property
    def gate(self) -> int:
        return self.symbols[GATE_SYMBOL]


def link(obj: bytes, base: int, config: int, resolve: Callable[[str], int]) -> Image:
    """Lay out ``obj``'s allocated sections at ``base`` and apply its relocations."""
    elf = ELFFile(BytesIO(obj))
    if elf.header["e_machine"] != "EM_X86_64" or elf.header["e_type"] != "ET_REL":
        raise AgentError("the agent object is not an x86-64 relocatable")
    placed: dict[int, int] = {}  # section index -> offset in the image
    size = 0
    for idx, sec in enumerate(elf.iter_sections()):
        flags = sec["sh_flags"]
        if not flags & SHF_ALLOC or sec["sh_size"] == 0:
            continue
        if flags & SHF_WRITE:
            raise AgentError(f"the agent has writable data ({sec.name}); it must keep none")
        if sec["sh_type"] == "SHT_NOBITS":
            raise AgentError(f"the agent has zero-initialised data ({sec.name})")
        align = max(1, sec["sh_addralign"])
        size = (size + align - 1) & ~(align - 1)
        placed[idx] = size
        size += sec["sh_size"]
    image = bytearray(size)
    for idx, off in placed.items():
        data = elf.get_section(idx).data()
        image[off : off + len(data)] = data
    symtab = elf.get_section_by_name(".symtab")
    if not isinstance(symtab, SymbolTableSection):
        raise AgentError("the agent object has no symbol table")
    defined: dict[str, int] = {}
    for sym in symtab.iter_symbols():
        shndx = sym["st_shndx"]
        if isinstance(shndx, int) and shndx in placed and sym.name:
            defined[sym.name] = base + placed[shndx] + sym["st_value"]
    imports: dict[str, int] = {}

    def value_of(sym_index: int) -> int:
        sym = symtab.get_symbol(sym_index)
        shndx = sym["st_shndx"]
        if sym["st_info"]["type"] == "STT_SECTION":
            if shndx not in placed:
                raise AgentError(f"relocation against an unplaced section {shndx}")
            return base + placed[shndx]
        if sym.name in defined:
            return defined[sym.name]
        if sym.name == CONFIG_SYMBOL:
            return config
        if sym.name not in imports:
            imports[sym.name] = resolve(sym.name)
        return imports[sym.name]

    for sec in elf.iter_sections():
        if not isinstance(sec, RelocationSection) or sec["sh_info"] not in placed:
            continue
        target_off = placed[sec["sh_info"]]
        for rel in sec.iter_relocations():
            kind = rel["r_info_type"]
            at = target_off + rel["r_offset"]
            s_a = value_of(rel["r_info_sym"]) + rel["r_addend"]
            p = base + at
            if kind == R_X86_64_64:
                struct.pack_into("<Q", image, at, s_a & ((1 << 64) - 1))
            elif kind in (R_X86_64_PC32, R_X86_64_PLT32):
                struct.pack_into("<i", image, at, _fit(s_a - p, True, rel))
            elif kind == R_X86_64_32S:
                struct.pack_into("<i", image, at, _fit(_signed64(s_a), True, rel))
            elif kind == R_X86_64_32:
                struct.pack_into("<I", image, at, _fit(s_a, False, rel))
            else:
                raise AgentError(f"unsupported relocation type {kind} in the agent")
    for must in (GATE_SYMBOL, ENTRY_SYMBOL):
        if must not in defined:
            raise AgentError(f"the agent object does not define {must}")
    return Image(base, bytes(image), defined, imports)


def _signed64(v: int) -> int:
    v &= (1 << 64) - 1
    return v - (1 << 64) if v >> 63 else v


def _fit(v: int, signed: bool, rel: object) -> int:
    lo, hi = (-(1 << 31), (1 << 31) - 1) if signed else (0, (1 << 32) - 1)
    if not lo <= v <= hi:
        raise AgentError(f"relocation {rel} does not fit in 32 bits ({v:#x})")
    return v


def main() -> None:
    """``python -m vmshield.space.agent``: build the agent and print the object path."""
    print(build())


if __name__ == "__main__":
    main()
