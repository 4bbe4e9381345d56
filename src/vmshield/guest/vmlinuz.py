"""Get the kernel ELF (``vmlinux``) out of a compressed x86 ``bzImage`` (``vmlinuz``).

Offline analysis and the tests need the decompressed kernel: its sections hold the BTF,
the kallsyms tables and the code vmshield compares guest memory against. Distributions ship
only the bzImage, so this module unpacks it the way the kernel's own boot stub does,
following the x86 boot protocol (Documentation/arch/x86/boot.rst):

* the real-mode setup is ``setup_sects`` 512-byte sectors (byte 0x1f1; 0 means 4) after
  the boot sector, so the protected-mode code starts at ``(setup_sects + 1) * 512``;
* ``payload_offset`` / ``payload_length`` (u32 LE at 0x248 / 0x24c, protocol 2.08+) locate
  the compressed kernel relative to that start;
* the kernel build appends the decompressed size as a u32 LE after the compressed stream
  (``size_append``; for gzip the stream's own ISIZE trailer is that same value), which we
  use both to bound the output before decompressing and to check it afterwards.

Debian's 5.10 and 6.1 cloud kernels use LZ4 (legacy frames), 6.12 uses zstd; both are
decompressed by the ``lz4`` / ``zstd`` command line tools, since the standard library has
neither. xz and gzip use :mod:`lzma` and :mod:`zlib`. The image is untrusted input: every
offset is bounds-checked and every failure is a :class:`GuestFormatError` naming the file
and offset.

The ELF helpers (:func:`elf_sections`, :func:`section_bytes`) read ELF64 section headers
with :mod:`struct` only, so finding ``.BTF`` or ``__ksymtab`` needs no binutils.
"""

from __future__ import annotations

import lzma
import os
import selectors
import shutil
import struct
import subprocess
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

from vmshield.errors import GuestFormatError, VmshieldError
from vmshield.paths import read_input

__all__ = [
    "MAX_BZIMAGE_SIZE",
    "MAX_VMLINUX_SIZE",
    "TOOL_TIMEOUT",
    "BzImageHeader",
    "DecompressorMissingError",
    "Section",
    "elf_sections",
    "extract_vmlinux",
    "extract_vmlinux_bytes",
    "parse_bzimage_header",
    "section_bytes",
]

MAX_VMLINUX_SIZE = 256 * 1024 * 1024
"""Largest decompressed kernel accepted. Debian cloud kernels are 45-60 MiB; the cap keeps
a forged size field or a decompression bomb from exhausting the host's memory."""

MAX_BZIMAGE_SIZE = 128 * 1024 * 1024
"""Largest bzImage read. Real ones are around 10-15 MiB."""

TOOL_TIMEOUT = 60.0
"""Seconds the lz4/zstd tools get. A real kernel takes well under a second."""

_SETUP_SECTS = 0x1F1
_HEADER_MAGIC_OFFSET = 0x202
_HEADER_MAGIC = b"HdrS"
_VERSION_OFFSET = 0x206
_PAYLOAD_OFFSET = 0x248
_PAYLOAD_LENGTH = 0x24C
_MIN_VERSION = 0x208  # the first boot protocol with payload_offset / payload_length
_HEADER_END = _PAYLOAD_LENGTH + 4

_LZ4_LEGACY = b"\x02\x21\x4c\x18"
_ZSTD = b"\x28\xb5\x2f\xfd"
_XZ = b"\xfd7zXZ\x00"
_GZIP = b"\x1f\x8b"
_XZ_MEMLIMIT = 512 * 1024 * 1024

_ELF_MAGIC = b"\x7fELF"
_ELFCLASS64 = 2
_ELF64_EHDR_SIZE = 64
_ELF64_SHDR_SIZE = 64
_SHN_UNDEF = 0
_SHN_XINDEX = 0xFFFF
_SHT_NOBITS = 8
_MAX_SECTIONS = 65536
_MAX_SECTION_NAME = 4096

_TOOL_PACKAGES = {"lz4": "lz4", "zstd": "zstd"}


class DecompressorMissingError(VmshieldError):
    """The ``lz4`` or ``zstd`` tool needed for this kernel is not installed on the host.

    Not a :class:`GuestFormatError`: the image may be fine, the host lacks a tool.
    """


@dataclass(frozen=True, slots=True)
class BzImageHeader:
    """The boot protocol fields needed to find the compressed kernel.

    ``payload_start`` is the absolute file offset of the compressed stream (the protocol's
    ``payload_offset`` is relative to the protected-mode code); ``compression`` is one of
    ``"lz4"``, ``"zstd"``, ``"xz"``, ``"gzip"``; ``decompressed_size`` is the size the
    kernel build appended after the stream.
    """

    setup_sects: int
    protocol_version: int
    payload_start: int
    payload_length: int
    compression: str
    decompressed_size: int


@dataclass(frozen=True, slots=True)
class Section:
    """One ELF section header: its name, virtual address, file offset and size.

    ``type`` is ``sh_type``; it matters because ``SHT_NOBITS`` sections (``.bss``) occupy
    no file bytes even though they have an offset and a size.
    """

    name: str
    addr: int
    offset: int
    size: int
    type: int = 0


def _u32(data: bytes, offset: int) -> int:
    value: int = struct.unpack_from("<I", data, offset)[0]
    return value


def parse_bzimage_header(image: bytes, *, source: str = "<bzImage>") -> BzImageHeader:
    """Validate a bzImage's setup header and locate its compressed payload.

    Separate from decompression so callers (and tests) can inspect a kernel image cheaply
    and so every bounds check happens before any decompressor sees a byte.
    """
    if len(image) < _HEADER_END:
        raise GuestFormatError(
            f"{source}: {len(image)} bytes is too short for an x86 boot header "
            f"(needs {_HEADER_END})"
        )
    magic = image[_HEADER_MAGIC_OFFSET : _HEADER_MAGIC_OFFSET + 4]
    if magic != _HEADER_MAGIC:
        raise GuestFormatError(
            f"{source}: no 'HdrS' boot header magic at offset {_HEADER_MAGIC_OFFSET:#x} "
            f"(found {magic.hex()}): not an x86 bzImage"
        )
    version: int = struct.unpack_from("<H", image, _VERSION_OFFSET)[0]
    if version < _MIN_VERSION:
        raise GuestFormatError(
            f"{source}: boot protocol {version >> 8}.{version & 0xFF:02} at offset "
            f"{_VERSION_OFFSET:#x} predates 2.08, which added payload_offset"
        )
    setup_sects = image[_SETUP_SECTS] or 4
    pm_start = (setup_sects + 1) * 512
    payload_offset = _u32(image, _PAYLOAD_OFFSET)
    payload_length = _u32(image, _PAYLOAD_LENGTH)
    start = pm_start + payload_offset
    end = start + payload_length
    if end > len(image):
        raise GuestFormatError(
            f"{source}: payload at file offset {start:#x}, {payload_length} bytes long "
            f"(payload_offset {payload_offset:#x} at {_PAYLOAD_OFFSET:#x}, payload_length at "
            f"{_PAYLOAD_LENGTH:#x}), runs past the end of the {len(image)}-byte file"
        )
    if payload_length < 8:
        raise GuestFormatError(
            f"{source}: payload_length {payload_length} at offset {_PAYLOAD_LENGTH:#x} is too "
            "short for a compressed kernel"
        )
    head = image[start : start + 6]
    if head.startswith(_LZ4_LEGACY):
        compression = "lz4"
    elif head.startswith(_ZSTD):
        compression = "zstd"
    elif head.startswith(_XZ):
        compression = "xz"
    elif head.startswith(_GZIP):
        compression = "gzip"
    else:
        raise GuestFormatError(
            f"{source}: payload at file offset {start:#x} starts with {head.hex()}, not a "
            "supported compression (lz4 legacy, zstd, xz, gzip)"
        )
    decompressed_size = _u32(image, end - 4)
    return BzImageHeader(
        setup_sects=setup_sects,
        protocol_version=version,
        payload_start=start,
        payload_length=payload_length,
        compression=compression,
        decompressed_size=decompressed_size,
    )


def _clean_stderr(raw: bytes) -> str:
    """The tool's complaint, shortened and stripped of control characters for the message."""
    text = raw[-400:].decode("utf-8", "replace")
    return "".join(c if c.isprintable() else " " for c in text).strip() or "no message"


def _run_tool(
    tool: str, stream: bytes, limit: int, timeout: float, source: str, start: int
) -> bytes:
    """Decompress ``stream`` with ``tool -d -c``, reading at most ``limit + 1`` bytes.

    The input comes from an anonymous temporary file (no writer thread, no pipe deadlock)
    and the output is read incrementally so a bomb is killed as soon as it exceeds the
    limit, rather than after it has filled memory or the disk; the deadline covers the
    whole run.
    """
    exe = shutil.which(tool)
    if exe is None:
        raise DecompressorMissingError(
            f"{source}: the kernel payload is {tool}-compressed and the '{tool}' command is "
            f"not installed; install the Debian package '{_TOOL_PACKAGES[tool]}' "
            f"(apt-get install {_TOOL_PACKAGES[tool]})"
        )
    deadline = time.monotonic() + timeout
    with tempfile.TemporaryFile() as stdin, tempfile.TemporaryFile() as stderr:
        stdin.write(stream)
        stdin.seek(0)
        try:
            proc = subprocess.Popen(
                [exe, "-d", "-c", "-q"], stdin=stdin, stdout=subprocess.PIPE, stderr=stderr
            )
        except OSError as exc:
            raise DecompressorMissingError(
                f"{source}: cannot run {exe}: {exc.strerror or exc}; reinstall the Debian "
                f"package '{_TOOL_PACKAGES[tool]}'"
            ) from None
        assert proc.stdout is not None  # stdout=PIPE guarantees it
        chunks: list[bytes] = []
        total = 0
        failure: str | None = None
        try:
            fd = proc.stdout.fileno()
            with selectors.DefaultSelector() as selector:
                selector.register(fd, selectors.EVENT_READ)
                while True:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        failure = f"{tool} did not finish within {timeout:g} s"
                        break
                    if not selector.select(remaining):
                        continue
                    chunk = os.read(fd, 1 << 20)
                    if not chunk:
                        break
                    total += len(chunk)
                    if total > limit:
                        failure = f"{tool} output exceeds the expected {limit} bytes"
                        break
                    chunks.append(chunk)
            if failure is None:
                try:
                    returncode = proc.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    failure = f"{tool} did not exit within {timeout:g} s"
                else:
                    if returncode != 0:
                        stderr.seek(0)
                        message = _clean_stderr(stderr.read(64 * 1024))
                        failure = f"{tool} failed (exit {returncode}): {message}"
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            proc.stdout.close()
    if failure is not None:
        raise GuestFormatError(f"{source}: payload at file offset {start:#x}: {failure}")
    return b"".join(chunks)


def _decompress_in_process(
    compression: str, stream: bytes, limit: int, source: str, start: int
) -> bytes:
    """xz and gzip through the standard library, with the output capped at ``limit + 1``."""
    try:
        if compression == "xz":
            xz = lzma.LZMADecompressor(format=lzma.FORMAT_XZ, memlimit=_XZ_MEMLIMIT)
            out = xz.decompress(stream, max_length=limit + 1)
            complete = xz.eof
        else:
            gz = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
            out = gz.decompress(stream, limit + 1)
            complete = gz.eof
    except (lzma.LZMAError, zlib.error, EOFError, ValueError) as exc:
        raise GuestFormatError(
            f"{source}: payload at file offset {start:#x}: corrupt {compression} data: {exc}"
        ) from None
    if len(out) <= limit and not complete:
        raise GuestFormatError(
            f"{source}: payload at file offset {start:#x}: {compression} stream is truncated"
        )
    return out


def extract_vmlinux_bytes(
    image: bytes,
    *,
    source: str = "<bzImage>",
    max_size: int = MAX_VMLINUX_SIZE,
    timeout: float = TOOL_TIMEOUT,
) -> bytes:
    """Decompress the kernel ELF inside an in-memory bzImage.

    The result is byte-identical to what the kernel's boot stub decompresses (before it
    relocates anything). It must be exactly the size the build appended and start with the
    ELF magic; anything else is a :class:`GuestFormatError`.
    """
    header = parse_bzimage_header(image, source=source)
    size = header.decompressed_size
    if size > max_size:
        raise GuestFormatError(
            f"{source}: the payload declares {size} decompressed bytes (u32 at file offset "
            f"{header.payload_start + header.payload_length - 4:#x}), above the {max_size}-byte "
            "limit"
        )
    if size < _ELF64_EHDR_SIZE:
        raise GuestFormatError(
            f"{source}: the payload declares {size} decompressed bytes, too small for an ELF"
        )
    payload = image[header.payload_start : header.payload_start + header.payload_length]
    if header.compression == "gzip":
        # The gzip member ends with its own ISIZE; the build appends nothing after it.
        elf = _decompress_in_process("gzip", payload, size, source, header.payload_start)
    else:
        stream = payload[:-4]  # drop the appended size, which no decompressor expects
        if header.compression == "xz":
            elf = _decompress_in_process("xz", stream, size, source, header.payload_start)
        else:
            elf = _run_tool(header.compression, stream, size, timeout, source, header.payload_start)
    if len(elf) != size:
        raise GuestFormatError(
            f"{source}: payload at file offset {header.payload_start:#x} decompressed to "
            f"{len(elf)} bytes{' or more' if len(elf) > size else ''}, but the image declares "
            f"{size}"
        )
    if not elf.startswith(_ELF_MAGIC):
        raise GuestFormatError(
            f"{source}: decompressed payload starts with {elf[:4].hex()}, not the ELF magic"
        )
    return elf


def extract_vmlinux(
    path: Path, *, max_size: int = MAX_VMLINUX_SIZE, timeout: float = TOOL_TIMEOUT
) -> bytes:
    """Decompress the kernel ELF inside the bzImage file at ``path``.

    See :func:`extract_vmlinux_bytes`; this adds a bounded read of the file, and an
    unreadable file is reported as a :class:`GuestFormatError` naming it.
    """
    source = str(path)
    too_large = f"larger than {MAX_BZIMAGE_SIZE} bytes, not a bzImage"
    image = read_input(path, MAX_BZIMAGE_SIZE, source, too_large, unreadable="cannot read: ")
    return extract_vmlinux_bytes(image, source=source, max_size=max_size, timeout=timeout)


def _section_name(elf: bytes, strtab_start: int, strtab_end: int, offset: int, index: int) -> str:
    """The NUL-terminated name at ``offset`` into the section name table, bounds-checked."""
    if offset >= strtab_end - strtab_start:
        raise GuestFormatError(
            f"ELF section {index}: name offset {offset:#x} is outside the section name table"
        )
    start = strtab_start + offset
    stop = min(strtab_end, start + _MAX_SECTION_NAME + 1)
    nul = elf.find(b"\x00", start, stop)
    if nul == -1:
        raise GuestFormatError(
            f"ELF section {index}: name at file offset {start:#x} is not NUL-terminated "
            f"within {min(stop - start, _MAX_SECTION_NAME)} bytes"
        )
    raw = elf[start:nul]
    try:
        name = raw.decode("ascii")
    except UnicodeDecodeError:
        raise GuestFormatError(
            f"ELF section {index}: name at file offset {start:#x} is not ASCII"
        ) from None
    if not name.isprintable():
        raise GuestFormatError(
            f"ELF section {index}: name at file offset {start:#x} has control characters"
        )
    return name


def elf_sections(elf: bytes) -> dict[str, Section]:
    """Section headers of an ELF64 file by name (the first one wins if a name repeats).

    Supports both byte orders and the extended numbering (``e_shnum == 0`` /
    ``e_shstrndx == SHN_XINDEX``) linkers use for files with 65280+ sections. Every table
    and name is bounds-checked against ``elf``; unnamed sections (the null section) are
    left out.
    """
    if len(elf) < _ELF64_EHDR_SIZE or not elf.startswith(_ELF_MAGIC):
        raise GuestFormatError("ELF: no ELF magic / header at offset 0")
    if elf[4] != _ELFCLASS64:
        raise GuestFormatError(f"ELF: class {elf[4]} at offset 0x4 is not ELFCLASS64")
    if elf[5] == 1:
        order = "<"
    elif elf[5] == 2:
        order = ">"
    else:
        raise GuestFormatError(f"ELF: data encoding {elf[5]} at offset 0x5 is invalid")
    shoff: int = struct.unpack_from(order + "Q", elf, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from(order + "HHH", elf, 0x3A)
    if shoff == 0:
        return {}  # no section header table
    if shentsize != _ELF64_SHDR_SIZE:
        raise GuestFormatError(
            f"ELF: e_shentsize {shentsize} at offset 0x3a, expected {_ELF64_SHDR_SIZE}"
        )
    header_fmt = order + "IIQQQQIIQQ"

    def header(index: int) -> tuple[int, ...]:
        at = shoff + index * _ELF64_SHDR_SIZE
        if at + _ELF64_SHDR_SIZE > len(elf):
            raise GuestFormatError(
                f"ELF: section header {index} at offset {at:#x} is past the end of the "
                f"{len(elf)}-byte file"
            )
        fields: tuple[int, ...] = struct.unpack_from(header_fmt, elf, at)
        return fields

    if shnum == 0 or shstrndx == _SHN_XINDEX:
        first = header(0)  # the null section carries the real count / string table index
        if shnum == 0:
            shnum = first[5]
        if shstrndx == _SHN_XINDEX:
            shstrndx = first[6]
    if shnum > _MAX_SECTIONS:
        raise GuestFormatError(f"ELF: {shnum} sections is more than the {_MAX_SECTIONS} accepted")
    if shoff + shnum * _ELF64_SHDR_SIZE > len(elf):
        raise GuestFormatError(
            f"ELF: section header table at offset {shoff:#x} ({shnum} entries) runs past the "
            f"end of the {len(elf)}-byte file"
        )
    if shstrndx == _SHN_UNDEF or shstrndx >= shnum:
        raise GuestFormatError(f"ELF: section name table index {shstrndx} is not a section")
    strtab = header(shstrndx)
    strtab_start, strtab_size = strtab[4], strtab[5]
    if strtab[1] == _SHT_NOBITS or strtab_start + strtab_size > len(elf):
        raise GuestFormatError(
            f"ELF: section name table at offset {strtab_start:#x} ({strtab_size} bytes) is "
            "not inside the file"
        )
    strtab_end = strtab_start + strtab_size
    sections: dict[str, Section] = {}
    for index in range(1, shnum):
        name_off, sh_type, _flags, addr, offset, size, *_rest = header(index)
        name = _section_name(elf, strtab_start, strtab_end, name_off, index)
        if not name or name in sections:
            continue
        sections[name] = Section(name=name, addr=addr, offset=offset, size=size, type=sh_type)
    return sections


def section_bytes(elf: bytes, name: str) -> bytes:
    """The file contents of section ``name`` (e.g. ``.BTF``, ``__ksymtab_strings``).

    A missing section, a ``SHT_NOBITS`` section (no file contents, e.g. ``.bss``) or one
    whose range lies outside the file is a :class:`GuestFormatError` naming it.
    """
    section = elf_sections(elf).get(name)
    if section is None:
        raise GuestFormatError(f"ELF: no section named {name!r}")
    if section.type == _SHT_NOBITS:
        raise GuestFormatError(f"ELF: section {name!r} is SHT_NOBITS and has no file contents")
    if section.offset + section.size > len(elf):
        raise GuestFormatError(
            f"ELF: section {name!r} at offset {section.offset:#x} ({section.size} bytes) runs "
            f"past the end of the {len(elf)}-byte file"
        )
    return elf[section.offset : section.offset + section.size]
