"""A generated, import-free kernel module that overwrites guest kernel bytes: the tamper test's
in-guest attacker.

The integrity checks of the security space (docs/security-space-plan.md, section 7) must be
shown to catch a writer that runs *inside* the guest kernel, and the module-free writers a
guest has (``/dev/mem``, ftrace, kprobes) all refuse to touch the bytes we care about. A
kernel module can write anywhere, so the test loads one. There are no kernel headers or
kbuild for every lab kernel (Debian's 6.12 kbuild tools need a newer libc than the host
has), so the module is built here, from parts that do not need them:

- the ``vermagic`` string and the ``module_layout`` CRC of ``__versions`` are copied from a
  real module of the same build (the cached, Debian-signed ``crc-itu-t.ko``): the loader
  compares both with the running kernel (``MODVERSIONS``). Debian's 7.3 is built without
  ``MODVERSIONS``: its modules have no ``__versions`` and neither has ours;
- ``.gnu.linkonce.this_module`` is ``sizeof(struct module)`` zero bytes with the name and
  the ``init`` pointer at their BTF offsets; the pointer is an ``R_X86_64_64`` relocation,
  which the module loader applies, exactly as for a kbuild module;
- the init function is a few lines of C generated with the address and bytes baked in and
  compiled by the host gcc with the kernel's code model. It imports nothing: the module
  has no undefined symbol, so no other CRC is needed.

The init function clears ``CR0.WP`` with interrupts off, writes the bytes, restores ``CR0``
and returns ``-ENODEV``, so the write happens and the module never stays loaded (``insmod``
reports "No such device"). The module is unsigned: the lab kernels have ``MODULE_SIG`` but
not ``MODULE_SIG_FORCE`` and lockdown is off, so it loads and taints the kernel.

This writes guest kernel memory on purpose. It is a lab tool for tests; nothing in the
monitor uses it.
"""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
import tempfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from vmshield.errors import GuestFormatError, LabError
from vmshield.guest.btf import Btf
from vmshield.guest.vmlinuz import section_bytes
from vmshield.paths import kernels_dir

MAX_DATA = 256
"""Most bytes one module writes: enough for a patch site or a page's first bytes, small
enough that the generated code stays a short, reviewable run of stores."""

KERNEL_HALF = 0xFF00_0000_0000_0000
"""First kernel-half address with 5-level paging (QEMU's `-cpu max` has LA57, and the
Debian kernels use it: the direct map, where page tables are written, then sits at
0xff...; with 4 levels the kernel half starts at 0xffff8000_00000000)."""

TEMPLATE_MODULE = "crc-itu-t.ko"
"""The real module of each cached kernel whose vermagic and ``module_layout`` CRC we copy."""

MODULE_NAME_LEN = 56
"""``MODULE_NAME_LEN`` (64 - sizeof(unsigned long)), the NUL included."""

ENDBR64 = bytes.fromhex("f30f1efa")
"""The init function is called indirectly (``do_one_initcall``); with IBT it must start here."""

INIT_SYMBOL = "init_module"
"""The name ``module_init()`` gives the init function in a kbuild module."""

CFLAGS = (
    "-O2",
    "-ffreestanding",
    "-fno-pic",
    "-mcmodel=kernel",
    "-mno-red-zone",
    "-fcf-protection=branch",
    "-fno-stack-protector",
    "-nostdlib",
    "-mgeneral-regs-only",
    "-fno-asynchronous-unwind-tables",
    "-fno-jump-tables",
    "-fno-builtin",
)
"""The kernel's own code-model flags, minus everything that would need a relocation or an
import (stack protector, unwind tables, builtins that could become ``memcpy`` calls)."""

_MODULE_NAME_RE = re.compile(rf"[A-Za-z0-9_]{{1,{MODULE_NAME_LEN - 1}}}")
_VERSION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")

# ELF constants (only what this file writes or checks).
_SHT_PROGBITS = 1
_SHT_SYMTAB = 2
_SHT_STRTAB = 3
_SHT_RELA = 4
_SHT_NOBITS = 8
_SHT_REL = 9
_SHT_NOTE = 7
_SHF_WRITE = 0x1
_SHF_ALLOC = 0x2
_SHF_EXECINSTR = 0x4
_SHF_INFO_LINK = 0x40
_STB_LOCAL = 0
_STB_GLOBAL = 1
_STT_OBJECT = 1
_STT_FUNC = 2
_STT_SECTION = 3
_R_X86_64_64 = 1
_ET_REL = 1
_EM_X86_64 = 62
_SHDR = struct.Struct("<IIQQQQIIQQ")
_SYM = struct.Struct("<IBBHQQ")
_RELA = struct.Struct("<QQq")
_MODVERSION = struct.Struct("<Q56s")


@dataclass(frozen=True)
class KernelTemplate:
    """What a module must carry to load on one kernel build, read from the cache."""

    version: str
    """The cache folder name ("5.10", "6.1", "6.12", "7.3")."""
    vermagic: str
    module_layout_crc: int | None
    """None when the build has no MODVERSIONS (7.3): then the module has no __versions."""
    module_size: int
    """``sizeof(struct module)``: BTF and the template's section size, which must agree."""
    name_offset: int
    init_offset: int


@dataclass(frozen=True)
class _ElfSection:
    name: str
    type: int
    flags: int
    offset: int
    size: int
    link: int
    info: int


def _elf_sections(elf: bytes, source: str) -> list[_ElfSection]:
    """Section headers of a small little-endian ELF64 relocatable, bounds-checked.

    :func:`vmshield.guest.vmlinuz.elf_sections` drops flags, links and repeated names,
    which the checks on the compiler's object need.
    """
    if len(elf) < 64 or elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        raise GuestFormatError(f"{source}: not a little-endian ELF64 file")
    (shoff,) = struct.unpack_from("<Q", elf, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)
    if shentsize != _SHDR.size or shoff + shnum * _SHDR.size > len(elf) or shstrndx >= shnum:
        raise GuestFormatError(f"{source}: bad section header table")
    raw = [_SHDR.unpack_from(elf, shoff + i * _SHDR.size) for i in range(shnum)]
    names_at, names_size = raw[shstrndx][4], raw[shstrndx][5]
    if names_at + names_size > len(elf):
        raise GuestFormatError(f"{source}: section name table outside the file")
    names = elf[names_at : names_at + names_size]
    out: list[_ElfSection] = []
    for i, (name, typ, flags, _addr, off, size, link, info, _al, _es) in enumerate(raw):
        end = names.find(b"\0", name)
        if name >= len(names) or end < 0:
            raise GuestFormatError(f"{source}: section {i} has a bad name offset")
        if typ != _SHT_NOBITS and off + size > len(elf):
            raise GuestFormatError(f"{source}: section {i} runs past the end of the file")
        out.append(
            _ElfSection(names[name:end].decode("latin-1"), typ, flags, off, size, link, info)
        )
    return out


def _section(elf: bytes, sections: list[_ElfSection], name: str, source: str) -> bytes:
    """The contents of the one section called ``name``."""
    found = [s for s in sections if s.name == name]
    if len(found) != 1:
        raise GuestFormatError(f"{source}: expected one {name} section, found {len(found)}")
    return elf[found[0].offset : found[0].offset + found[0].size]


def _modinfo(blob: bytes) -> dict[str, str]:
    """``key=value`` strings of a ``.modinfo`` section (NUL-separated, padding skipped)."""
    info: dict[str, str] = {}
    for item in blob.split(b"\0"):
        key, sep, value = item.decode("utf-8", "replace").partition("=")
        if sep:
            info.setdefault(key, value)
    return info


def _versions(blob: bytes) -> dict[str, int]:
    """Symbol name -> CRC from a ``__versions`` section (``struct modversion_info`` array)."""
    out: dict[str, int] = {}
    for at in range(0, len(blob) - _MODVERSION.size + 1, _MODVERSION.size):
        crc, raw = _MODVERSION.unpack_from(blob, at)
        out[raw.split(b"\0", 1)[0].decode("ascii", "replace")] = crc
    return out


def _kernel_dir(kernel_version: str) -> Path:
    """The cache folder of a kernel build: by folder name ("6.1") or by release string
    ("6.1.0-50-cloud-amd64", what ``uname -r`` and :attr:`Kernel.release` say), since a
    caller holding an attached kernel knows the latter. Only plain names are accepted, so
    no path can be smuggled in."""
    if not _VERSION_RE.fullmatch(kernel_version):
        raise ValueError(f"kernel version {kernel_version!r} is not a cache folder name")
    root = kernels_dir()
    folder = root / kernel_version
    if folder.is_dir():
        return folder
    if root.is_dir():
        for candidate in sorted(root.iterdir()):
            release = candidate / "release"
            if release.is_file() and release.read_text().strip() == kernel_version:
                return candidate
    raise LabError(
        f"kernel {kernel_version} is not in the cache (no {folder}, and no cached kernel "
        f"has that release); `make setup` fetches the kernels"
    )


def kernel_template(kernel_version: str) -> KernelTemplate:
    """What a module for ``kernel_version`` (cache folder name or release) must carry.

    The ``struct module`` layout comes from the vmlinux BTF and its size is checked against
    the template module's ``.gnu.linkonce.this_module``, which kbuild sized from the same
    build: two independent sources, so a wrong cache entry fails here and not in the guest.
    """
    return _read_template(_kernel_dir(kernel_version))


@cache
def _read_template(folder: Path) -> KernelTemplate:
    """:func:`kernel_template` for one cache folder, read once per process (BTF parsing
    of a 50 MB vmlinux is the slow part)."""
    kernel_version = folder.name
    template_path = folder / "modules" / TEMPLATE_MODULE
    vmlinux_path = folder / "vmlinux"
    for path in (template_path, vmlinux_path):
        if not path.is_file():
            raise LabError(f"{path} is missing; `make setup` fetches it")
    source = str(template_path)
    template = template_path.read_bytes()
    sections = _elf_sections(template, source)
    vermagic = _modinfo(_section(template, sections, ".modinfo", source)).get("vermagic")
    if not vermagic:
        raise GuestFormatError(f"{source}: no vermagic in .modinfo")
    crc: int | None = None
    if any(sec.name == "__versions" for sec in sections):
        crc = _versions(_section(template, sections, "__versions", source)).get("module_layout")
        if crc is None:
            raise GuestFormatError(f"{source}: no module_layout entry in __versions")
    this_module = _section(template, sections, ".gnu.linkonce.this_module", source)
    release_path = folder / "release"
    if release_path.is_file():
        release = release_path.read_text().strip()
        if not vermagic.startswith(release + " "):
            raise LabError(f"{source}: vermagic {vermagic!r} is not for release {release}")

    btf = Btf.parse(section_bytes(vmlinux_path.read_bytes(), ".BTF"))
    size = btf.sizeof("module")
    if size != len(this_module):
        raise LabError(
            f"kernel {kernel_version}: BTF sizeof(struct module) is {size} but "
            f"{TEMPLATE_MODULE} has a {len(this_module)}-byte .gnu.linkonce.this_module"
        )
    return KernelTemplate(
        version=kernel_version,
        vermagic=vermagic,
        module_layout_crc=crc,
        module_size=size,
        name_offset=btf.member_offset("module", "name"),
        init_offset=btf.member_offset("module", "init"),
    )


def init_source(
    address: int, data: bytes, keep_wp_clear: bool = False, unlink: bool = False, msr: int = 0
) -> str:
    """C source of the init function: one volatile store per byte, all constants.

    Stores of immediates (rather than a copy loop over an array) keep the code free of
    data sections and relocations; the empty asm hides the address's value from the
    optimiser, so every store is a plain ``movb $imm, i(%reg)`` off one base register.
    ``keep_wp_clear`` leaves ``CR0.WP`` clear on that vCPU afterwards (the "clear WP and
    leave it" rootkit technique). ``unlink`` ignores ``data`` and takes ``address`` as a
    ``struct list_head``: it is taken off its list with the neighbours read at run time
    (the tamper module itself may be one of them) and left pointing at itself, as
    ``list_del_init`` does (the "hide a module" technique). ``msr`` ignores ``data``
    and writes ``address`` into that MSR with ``wrmsr`` on the vCPU running ``insmod``
    (the "redirect LSTAR" technique: a rootkit's ``wrmsrl``, without its import).
    ``write_cr0`` is not used: the kernel pins WP in it. If ``CR4.CET`` is on (IBT kernels
    on CET hardware) WP cannot be cleared, so CET is dropped around the write too; with
    interrupts off nothing runs in between.
    """
    stores = "\n".join(f"\tp[{i}] = {b:#04x};" for i, b in enumerate(data))
    if unlink:
        stores = (
            "\tvolatile unsigned long *node = (volatile unsigned long *)p;\n"
            "\tvolatile unsigned long *next = (volatile unsigned long *)node[0];\n"
            "\tvolatile unsigned long *prev = (volatile unsigned long *)node[1];\n"
            "\tprev[0] = (unsigned long)next;\n"
            "\tnext[1] = (unsigned long)prev;\n"
            "\tnode[0] = (unsigned long)node;\n"
            "\tnode[1] = (unsigned long)node;"
        )
    if msr:
        stores = (
            f'\tasm volatile("wrmsr" :: "c"({msr:#x}U), "a"((unsigned)(unsigned long)p),\n'
            '\t\t     "d"((unsigned)((unsigned long)p >> 32)) : "memory");'
        )
    # CET cannot be on while WP is clear: left clear, CET stays off too.
    restore = (
        '\tasm volatile("mov %0, %%cr0" :: "r"(cr0 & ~CR0_WP) : "memory");'
        if keep_wp_clear
        else '\tasm volatile("mov %0, %%cr0" :: "r"(cr0) : "memory");\n'
        "\tif (cr4 & CR4_CET)\n"
        '\t\tasm volatile("mov %0, %%cr4" :: "r"(cr4) : "memory");'
    )
    return f"""\
/* Generated by vmshield.lab.tampermod: writes {len(data)} byte(s) at {address:#x}. */
#define CR0_WP (1UL << 16)
#define CR4_CET (1UL << 23)
#define ENODEV 19

int {INIT_SYMBOL}(void)
{{
\tvolatile unsigned char *p = (volatile unsigned char *){address:#x}UL;
\tunsigned long cr0, cr4;

\tasm("" : "+r"(p)); /* one base register: plain [p + i] stores */
\tasm volatile("cli" ::: "memory");
\tasm volatile("mov %%cr4, %0" : "=r"(cr4) :: "memory");
\tif (cr4 & CR4_CET)
\t\tasm volatile("mov %0, %%cr4" :: "r"(cr4 & ~CR4_CET) : "memory");
\tasm volatile("mov %%cr0, %0" : "=r"(cr0) :: "memory");
\tasm volatile("mov %0, %%cr0" :: "r"(cr0 & ~CR0_WP) : "memory");
{stores}
{restore}
\tasm volatile("sti" ::: "memory");
\treturn -ENODEV;
}}
"""


def _validate(address: int, data: bytes, name: str, msr: int = 0) -> None:
    """Refuse what would not be a short write into the kernel half, or a bad module name."""
    if msr and not data:
        data = b"\0"  # an MSR write: ``address`` is the value, nothing is stored
    if not 0 <= msr < 1 << 32:
        raise ValueError(f"msr {msr:#x} is not a 32-bit MSR index")
    if not isinstance(data, bytes | bytearray) or not 1 <= len(data) <= MAX_DATA:
        raise ValueError(f"data must be 1..{MAX_DATA} bytes")
    if not KERNEL_HALF <= address <= (1 << 64) - len(data):
        raise ValueError(
            f"address {address:#x} (+{len(data)} bytes) is not in the kernel half "
            f"{KERNEL_HALF:#x}..{(1 << 64) - 1:#x}"
        )
    if not _MODULE_NAME_RE.fullmatch(name):
        raise ValueError(
            f"module name {name!r}: use 1..{MODULE_NAME_LEN - 1} letters, digits or '_'"
        )


def compile_init(
    address: int, data: bytes, keep_wp_clear: bool = False, unlink: bool = False, msr: int = 0
) -> bytes:
    """Machine code of the init function (starting at its first byte), from the host gcc.

    The compiler's object is checked rather than trusted: the code must be alone in
    ``.text`` at offset 0, begin with ``endbr64``, and need no relocation and no data,
    since only the code bytes are carried over into the module.
    """
    gcc = shutil.which("gcc")
    if gcc is None:
        raise LabError("gcc is missing; `make setup` installs it")
    with tempfile.TemporaryDirectory(prefix="vmshield-tamper-") as tmp:
        src = Path(tmp) / "tamper.c"
        obj = Path(tmp) / "tamper.o"
        src.write_text(
            RESIDENT_SOURCE if address == 0 else init_source(address, data, keep_wp_clear,
                                                             unlink, msr)
        )  # fmt: skip
        res = subprocess.run(
            [gcc, *CFLAGS, "-c", str(src), "-o", str(obj)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if res.returncode != 0:
            raise LabError(f"gcc failed ({res.returncode}): {res.stderr.strip()[-2000:]}")
        elf = obj.read_bytes()
    sections = _elf_sections(elf, "tamper.o")
    for s in sections:
        if s.type in (_SHT_RELA, _SHT_REL):
            raise LabError(f"tamper.o: the code needs relocations ({s.name})")
        if s.flags & _SHF_ALLOC and s.size and s.name != ".text" and s.type != _SHT_NOTE:
            raise LabError(f"tamper.o: the code uses an extra section ({s.name})")
    code = _section(elf, sections, ".text", "tamper.o")
    if _symbol_value(elf, sections, INIT_SYMBOL) != 0:
        raise LabError(f"tamper.o: {INIT_SYMBOL} is not at the start of .text")
    if not code.startswith(ENDBR64):
        raise LabError("tamper.o: the init function does not start with endbr64")
    return code


def _symbol_value(elf: bytes, sections: list[_ElfSection], name: str) -> int | None:
    """``st_value`` of a symbol defined in the object, or None."""
    for s in sections:
        if s.type != _SHT_SYMTAB:
            continue
        strtab = sections[s.link]
        names = elf[strtab.offset : strtab.offset + strtab.size]
        for at in range(s.offset, s.offset + s.size - _SYM.size + 1, _SYM.size):
            st_name, _info, _other, shndx, value, _size = _SYM.unpack_from(elf, at)
            if shndx and names[st_name:].split(b"\0", 1)[0] == name.encode():
                return int(value)
    return None


@dataclass
class _OutSection:
    name: str
    type: int
    flags: int
    data: bytes
    align: int
    link: int = 0
    info: int = 0
    entsize: int = 0


def _strtab(names: list[str]) -> tuple[bytes, dict[str, int]]:
    """A string table holding ``names`` (offset 0 is the empty name)."""
    blob = bytearray(b"\0")
    where: dict[str, int] = {"": 0}
    for n in names:
        if n not in where:
            where[n] = len(blob)
            blob += n.encode() + b"\0"
    return bytes(blob), where


def _write_elf(sections: list[_OutSection]) -> bytes:
    """An ELF64 x86-64 relocatable holding ``sections`` (index 0, the null section, is
    implied; ``.shstrtab`` is appended last)."""
    shstr, shnames = _strtab([s.name for s in sections] + [".shstrtab"])
    every = [*sections, _OutSection(".shstrtab", _SHT_STRTAB, 0, shstr, 1)]
    out = bytearray(64)
    offsets: list[int] = []
    for s in every:
        if s.type != _SHT_NOBITS:
            out += b"\0" * (-len(out) % s.align)
        offsets.append(len(out))
        out += s.data
    out += b"\0" * (-len(out) % 8)
    shoff = len(out)
    out += b"\0" * _SHDR.size
    for s, off in zip(every, offsets, strict=True):
        out += _SHDR.pack(
            shnames[s.name], s.type, s.flags, 0, off, len(s.data), s.link, s.info, s.align,
            s.entsize,
        )  # fmt: skip
    ident = b"\x7fELF" + bytes([2, 1, 1, 0]) + b"\0" * 8
    header = ident + struct.pack(
        "<HHIQQQIHHHHHH", _ET_REL, _EM_X86_64, 1, 0, 0, shoff, 0, 64, 0, 0, _SHDR.size,
        len(every) + 1, len(every),
    )  # fmt: skip
    out[:64] = header
    return bytes(out)


def link_module(
    template: KernelTemplate, name: str, code: bytes, description: str, resident: bytes = b""
) -> bytes:
    """The loadable module: ``code`` as its init function, nothing imported or exported.

    Sections, in the order the loader meets them: ``.init.text`` (freed after init, like
    any ``__init`` code), ``.modinfo``, ``__versions`` (``module_layout`` only; none for
    a kernel without MODVERSIONS),
    ``.gnu.linkonce.this_module`` and its relocation, ``.symtab``/``.strtab``. The loader
    wants exactly one symbol table and a this_module section of the kernel's exact
    ``sizeof(struct module)``; the relocation target is zero, as it insists.
    """
    modinfo = b"".join(
        f"{k}={v}".encode() + b"\0"
        for k, v in (
            ("license", "GPL"),
            ("description", description),
            ("retpoline", "Y"),  # true: the code has no indirect branch
            ("name", name),
            ("vermagic", template.vermagic),
        )
    )
    crc = template.module_layout_crc
    this_module = bytearray(template.module_size)
    raw_name = name.encode()
    this_module[template.name_offset : template.name_offset + len(raw_name)] = raw_name

    # Section indices: .init.text 1, .modinfo 2, then __versions 3 when there is one.
    text = 1
    mod_i = 4 if crc is not None else 3
    rela_i, symtab_i, strtab_i = mod_i + 1, mod_i + 2, mod_i + 3
    strtab, at = _strtab([INIT_SYMBOL, "__this_module"])
    symbols = b"".join(
        (
            _SYM.pack(0, 0, 0, 0, 0, 0),
            _SYM.pack(0, (_STB_LOCAL << 4) | _STT_SECTION, 0, text, 0, 0),
            _SYM.pack(0, (_STB_LOCAL << 4) | _STT_SECTION, 0, mod_i, 0, 0),
            _SYM.pack(at[INIT_SYMBOL], (_STB_GLOBAL << 4) | _STT_FUNC, 0, text, 0, len(code)),
            _SYM.pack(
                at["__this_module"], (_STB_GLOBAL << 4) | _STT_OBJECT, 0, mod_i, 0,
                template.module_size,
            ),
        )
    )  # fmt: skip
    first_global, init_sym = 3, 3
    rela = _RELA.pack(template.init_offset, (init_sym << 32) | _R_X86_64_64, 0)
    sections = [
        _OutSection(".init.text", _SHT_PROGBITS, _SHF_ALLOC | _SHF_EXECINSTR, code, 16),
        _OutSection(".modinfo", _SHT_PROGBITS, _SHF_ALLOC, modinfo, 1),
        _OutSection(
            ".gnu.linkonce.this_module", _SHT_PROGBITS, _SHF_WRITE | _SHF_ALLOC,
            bytes(this_module), 64,
        ),
        _OutSection(
            ".rela.gnu.linkonce.this_module", _SHT_RELA, _SHF_INFO_LINK, rela, 8,
            link=symtab_i, info=mod_i, entsize=_RELA.size,
        ),
        _OutSection(
            ".symtab", _SHT_SYMTAB, 0, symbols, 8, link=strtab_i, info=first_global,
            entsize=_SYM.size,
        ),
        _OutSection(".strtab", _SHT_STRTAB, 0, strtab, 1),
    ]  # fmt: skip
    if resident:  # resident code (after the indices above, so they stay as they are)
        sections.append(_OutSection(".text", _SHT_PROGBITS, _SHF_ALLOC | _SHF_EXECINSTR,
                                    resident, 16))  # fmt: skip
    if crc is not None:
        versions = _MODVERSION.pack(crc, b"module_layout")
        sections.insert(2, _OutSection("__versions", _SHT_PROGBITS, _SHF_ALLOC, versions, 32))
    assert sections[mod_i - 1].name == ".gnu.linkonce.this_module"  # the indices used above
    assert sections[rela_i - 1].type == _SHT_RELA
    return _write_elf(sections)


def build_tamper_module(
    kernel_version: str,
    address: int,
    data: bytes,
    name: str = "vms_tamper",
    keep_wp_clear: bool = False,
    unlink: bool = False,
    msr: int = 0,
) -> bytes:
    """A ``.ko`` for cached kernel ``kernel_version`` whose init writes ``data`` at the
    kernel virtual ``address`` (read-only text and vmalloc'd code included) and fails with
    ``-ENODEV``, so ``insmod`` reports an error and nothing stays loaded.

    Raises ValueError for bad arguments (before anything is compiled) and LabError when
    the cache or the toolchain lacks something.
    """
    _validate(address, data, name, msr)
    template = kernel_template(kernel_version)
    code = compile_init(address, bytes(data), keep_wp_clear, unlink, msr)
    description = f"vmshield tamper test: {len(data)} byte(s) at {address:#x}"
    if msr:
        description = f"vmshield tamper test: MSR {msr:#x} = {address:#x}"
    return link_module(template, name, code, description)


RESIDENT_SOURCE = f"""\
/* Generated by vmshield.lab.tampermod: a module that stays, for its .text alone. */
int {INIT_SYMBOL}(void)
{{
\treturn 0;
}}
"""


def build_resident_module(kernel_version: str, text: bytes, name: str = "vms_resident") -> bytes:
    """A ``.ko`` whose init succeeds, so it stays loaded, and whose ``.text`` (the start
    of its core text, :attr:`vmshield.guest.modules.Module.base`) holds ``text``: code a
    technique points the CPU at (a system call trampoline) that must outlive ``insmod``.
    It has no exit function, so it cannot be unloaded: a lab guest is rebooted anyway.
    ``text`` must be position-independent (no relocation is applied to it)."""
    if not 1 <= len(text) <= MAX_DATA:
        raise ValueError(f"text must be 1..{MAX_DATA} bytes")
    _validate(KERNEL_HALF, b"\0", name)
    template = kernel_template(kernel_version)
    code = compile_init(0, b"")
    return link_module(template, name, code, "vmshield lab: resident code", resident=bytes(text))
