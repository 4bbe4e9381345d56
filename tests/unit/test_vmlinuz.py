"""Tests of bzImage extraction and the ELF section reader.

The real Debian kernels (LZ4 for 5.10/6.1, zstd for 6.12) must decompress byte for byte
to the reference ``vmlinux`` cached next to them. The xz and gzip paths, and every error
path, use small synthetic images built here; hypothesis corrupts those to hold the
extractor to its contract: an ELF or a GuestFormatError, nothing else.
"""

from __future__ import annotations

import contextlib
import gzip
import lzma
import struct
import subprocess
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmshield.errors import GuestFormatError
from vmshield.guest import vmlinuz
from vmshield.guest.vmlinuz import (
    DecompressorMissingError,
    Section,
    elf_sections,
    extract_vmlinux,
    extract_vmlinux_bytes,
    parse_bzimage_header,
    section_bytes,
)
from vmshield.paths import kernels_dir

EXPECTED_COMPRESSION = {"5.10": "lz4", "6.1": "lz4", "6.12": "zstd"}
SHT_PROGBITS, SHT_STRTAB, SHT_NOBITS = 1, 3, 8


def cached_kernel(spec: str) -> tuple[Path, Path]:
    """The cached vmlinuz and reference vmlinux of ``spec``; fail loudly when missing."""
    directory = kernels_dir() / spec
    vmlinuz_file, vmlinux_file = directory / "vmlinuz", directory / "vmlinux"
    missing = [str(p) for p in (vmlinuz_file, vmlinux_file) if not p.is_file()]
    if missing:
        pytest.fail(
            f"kernel {spec} is not cached ({', '.join(missing)} missing): run `make setup` "
            "to fetch the test kernels",
            pytrace=False,
        )
    return vmlinuz_file, vmlinux_file


# ------------------------------------------------------------------ synthetic artifacts


def make_elf(sections: list[tuple[str, int, int, bytes | int]], big_endian: bool = False) -> bytes:
    """A minimal ELF64 file: ``(name, sh_type, addr, contents or NOBITS size)`` sections
    after the null section, then .shstrtab, then the section header table."""
    order = ">" if big_endian else "<"
    names = b"\x00"
    body = b""
    headers = [b"\x00" * 64]
    data_start = 64
    all_sections = [*sections, (".shstrtab", SHT_STRTAB, 0, b"")]
    name_offsets = []
    for name, *_ in all_sections:
        name_offsets.append(len(names))
        names += name.encode() + b"\x00"
    for (_name, sh_type, addr, contents), name_off in zip(all_sections, name_offsets, strict=True):
        offset = data_start + len(body)
        if isinstance(contents, int):
            size = contents
        else:
            if sh_type == SHT_STRTAB:
                contents = names
            size = len(contents)
            body += contents
        headers.append(
            struct.pack(order + "IIQQQQIIQQ", name_off, sh_type, 0, addr, offset, size, 0, 0, 1, 0)
        )
    shoff = data_start + len(body)
    ident = b"\x7fELF" + bytes([2, 2 if big_endian else 1, 1]) + b"\x00" * 9
    ehdr = ident + struct.pack(
        order + "HHIQQQIHHHHHH",
        2,  # ET_EXEC
        62,  # EM_X86_64
        1,
        0xFFFFFFFF81000000,
        0,
        shoff,
        0,
        64,
        0,
        0,
        64,
        len(headers),
        len(headers) - 1,
    )
    return ehdr + body + b"".join(headers)


SMALL_ELF = make_elf(
    [
        (".text", SHT_PROGBITS, 0xFFFFFFFF81000000, b"\x0f\x0b" * 300),
        (".rodata", SHT_PROGBITS, 0xFFFFFFFF82000000, b"Linux version 6.1.0 (synthetic)\n\x00"),
        (".BTF", SHT_PROGBITS, 0xFFFFFFFF82100000, b"\x9f\xeb\x01\x00" + bytes(range(200))),
        (".bss", SHT_NOBITS, 0xFFFFFFFF82E62000, 0x39E000),
    ]
)


def size_append(size: int) -> bytes:
    return struct.pack("<I", size)


def compress(data: bytes, method: str) -> bytes:
    """The payload the kernel build makes: compressed stream + appended size (not gzip)."""
    if method == "gzip":
        return gzip.compress(data, mtime=0)
    if method == "xz":
        filters = [{"id": lzma.FILTER_X86}, {"id": lzma.FILTER_LZMA2, "preset": 6}]
        stream = lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32, filters=filters)
    elif method == "lz4":
        stream = subprocess.run(
            ["lz4", "-l", "-c1", "-q"], input=data, capture_output=True, check=True
        ).stdout
    else:
        stream = subprocess.run(
            ["zstd", "-19", "-q", "-c"], input=data, capture_output=True, check=True
        ).stdout
    return stream + size_append(len(data))


def make_bzimage(payload: bytes, *, setup_sects: int = 4, version: int = 0x20F) -> bytes:
    """A bzImage-shaped file: boot sector + setup, a fake decompressor stub, the payload."""
    setup = bytearray(((setup_sects or 4) + 1) * 512)
    setup[0x1F1] = setup_sects
    setup[0x1FE:0x200] = b"\x55\xaa"
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, version)
    stub = b"\x90" * 0x2CC  # where Debian's images put the payload, relative to pm start
    struct.pack_into("<II", setup, 0x248, len(stub), len(payload))
    return bytes(setup) + stub + payload + b"\x00" * 0x40


IMAGES = {method: make_bzimage(compress(SMALL_ELF, method)) for method in ("gzip", "xz")}
TOOL_IMAGES = {method: make_bzimage(compress(SMALL_ELF, method)) for method in ("lz4", "zstd")}


# ----------------------------------------------------------------------- real kernels


@pytest.mark.parametrize("spec", sorted(EXPECTED_COMPRESSION))
def test_real_kernel_extracts_byte_identical(spec: str) -> None:
    vmlinuz_file, vmlinux_file = cached_kernel(spec)
    image = vmlinuz_file.read_bytes()
    header = parse_bzimage_header(image)
    assert header.compression == EXPECTED_COMPRESSION[spec]
    assert header.protocol_version >= 0x208
    started = time.perf_counter()
    elf = extract_vmlinux(vmlinuz_file)
    elapsed = time.perf_counter() - started
    reference = vmlinux_file.read_bytes()
    assert len(elf) == len(reference) == header.decompressed_size
    assert elf == reference
    print(f"extract {spec} ({header.compression}): {elapsed:.2f} s, {len(elf)} bytes")


@pytest.mark.parametrize("spec", sorted(EXPECTED_COMPRESSION))
def test_real_kernel_sections(spec: str) -> None:
    _, vmlinux_file = cached_kernel(spec)
    elf = vmlinux_file.read_bytes()
    sections = elf_sections(elf)
    text = sections[".text"]
    assert text.addr == 0xFFFFFFFF81000000
    assert text.type == SHT_PROGBITS
    assert {".rodata", ".data", ".bss", "__ksymtab", "__ksymtab_strings", ".BTF"} <= set(sections)
    btf = section_bytes(elf, ".BTF")
    assert btf[:2] == b"\x9f\xeb"  # BTF_MAGIC 0xeb9f, little-endian
    assert len(btf) == sections[".BTF"].size
    assert b"\x00init_task\x00" in btf
    assert section_bytes(elf, "__ksymtab_strings").endswith(b"\x00")
    with pytest.raises(GuestFormatError, match="SHT_NOBITS"):
        section_bytes(elf, ".bss")


# ----------------------------------------------------------------- synthetic images


@pytest.mark.parametrize("method", ["gzip", "xz", "lz4", "zstd"])
def test_each_compression(method: str, tmp_path: Path) -> None:
    image = {**IMAGES, **TOOL_IMAGES}[method]
    assert parse_bzimage_header(image).compression == method
    path = tmp_path / "vmlinuz"
    path.write_bytes(image)
    assert extract_vmlinux(path) == SMALL_ELF


def test_setup_sects_zero_means_four() -> None:
    image = make_bzimage(compress(SMALL_ELF, "gzip"), setup_sects=0)
    header = parse_bzimage_header(image)
    assert header.setup_sects == 4
    assert header.payload_start == 5 * 512 + 0x2CC
    assert extract_vmlinux_bytes(image) == SMALL_ELF


def _set(image: bytes, offset: int, fmt: str, value: int) -> bytes:
    patched = bytearray(image)
    struct.pack_into(fmt, patched, offset, value)
    return bytes(patched)


@pytest.mark.parametrize(
    ("image", "fragment"),
    [
        (b"", "too short for an x86 boot header"),
        (IMAGES["gzip"][:0x24F], "too short"),
        (
            _set(IMAGES["gzip"], 0x202, "<I", 0x12345678),
            "no 'HdrS' boot header magic at offset 0x202",
        ),
        (_set(IMAGES["gzip"], 0x206, "<H", 0x0207), "boot protocol 2.07 at offset 0x206"),
        (_set(IMAGES["gzip"], 0x24C, "<I", 0xFFFFFFF0), "runs past the end"),
        (_set(IMAGES["gzip"], 0x248, "<I", 0xFFFFFFF0), "runs past the end"),
        (_set(IMAGES["gzip"], 0x24C, "<I", 4), "too short for a compressed kernel"),
        (_set(IMAGES["gzip"], 0x248, "<I", 0), "not a supported compression"),
        (_set(IMAGES["gzip"], 0x1F1, "<B", 200), "runs past the end"),
        (make_bzimage(compress(SMALL_ELF, "xz")[:-4] + size_append(1 << 30)), "limit"),
        (make_bzimage(compress(SMALL_ELF, "xz")[:-4] + size_append(10)), "too small"),
    ],
)
def test_header_errors(image: bytes, fragment: str) -> None:
    with pytest.raises(GuestFormatError) as info:
        extract_vmlinux_bytes(image, source="bad-vmlinuz")
    assert str(info.value).startswith("bad-vmlinuz: ")
    assert fragment in str(info.value)


def test_payload_must_be_an_elf_of_the_declared_size() -> None:
    not_elf = b"MZ" + bytes(4000)
    with pytest.raises(GuestFormatError, match="not the ELF magic"):
        extract_vmlinux_bytes(make_bzimage(compress(not_elf, "xz")))
    short = compress(SMALL_ELF, "xz")[:-4] + size_append(len(SMALL_ELF) + 100)
    with pytest.raises(
        GuestFormatError, match=r"decompressed to \d+ bytes, but the image declares"
    ):
        extract_vmlinux_bytes(make_bzimage(short))
    long = compress(SMALL_ELF, "zstd")[:-4] + size_append(len(SMALL_ELF) - 100)
    with pytest.raises(GuestFormatError, match="zstd output exceeds the expected"):
        extract_vmlinux_bytes(make_bzimage(long))
    long = compress(SMALL_ELF, "gzip")
    long = long[:-4] + size_append(len(SMALL_ELF) - 100)  # forge gzip's ISIZE
    with pytest.raises(GuestFormatError, match="bytes or more, but the image declares"):
        extract_vmlinux_bytes(make_bzimage(long))


def test_corrupt_streams_are_format_errors() -> None:
    for method in ("gzip", "xz", "lz4", "zstd"):
        payload = compress(SMALL_ELF, method)
        head = 6 if method == "xz" else 4
        broken = payload[:head] + bytes(len(payload) - head - 4) + payload[-4:]
        with pytest.raises(GuestFormatError, match="payload at file offset"):
            extract_vmlinux_bytes(make_bzimage(broken), source=method)
        truncated = payload[: len(payload) // 2] + payload[-4:]
        with pytest.raises(GuestFormatError, match="payload at file offset"):
            extract_vmlinux_bytes(make_bzimage(truncated), source=method)


def test_missing_tool_names_the_debian_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("shutil.which", lambda _name: None)
    with pytest.raises(DecompressorMissingError, match="Debian package 'zstd'"):
        extract_vmlinux_bytes(TOOL_IMAGES["zstd"])
    with pytest.raises(DecompressorMissingError, match="Debian package 'lz4'"):
        extract_vmlinux_bytes(TOOL_IMAGES["lz4"])
    assert not issubclass(DecompressorMissingError, GuestFormatError)


def test_tool_timeout_kills_the_tool() -> None:
    with pytest.raises(GuestFormatError, match="lz4 did not finish within 0 s"):
        extract_vmlinux_bytes(TOOL_IMAGES["lz4"], timeout=0)


def test_extract_vmlinux_file_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(GuestFormatError, match=f"{missing}: cannot read"):
        extract_vmlinux(missing)
    big = tmp_path / "big"
    big.write_bytes(IMAGES["gzip"])
    monkeypatch.setattr(vmlinuz, "MAX_BZIMAGE_SIZE", 1000)
    with pytest.raises(GuestFormatError, match="larger than 1000 bytes"):
        extract_vmlinux(big)


@settings(max_examples=300, deadline=None)
@given(
    method=st.sampled_from(["gzip", "xz"]),
    edits=st.lists(st.tuples(st.integers(0, 4000), st.integers(0, 255)), max_size=4),
    cut=st.integers(0, 5000),
)
def test_fuzz_corrupted_in_process_images(
    method: str, edits: list[tuple[int, int]], cut: int
) -> None:
    """Byte flips aimed at the boot header and payload start, plus truncation."""
    image = bytearray(IMAGES[method])
    for where, value in edits:
        # Half the edits hit the header fields (0x1f0..0x260), the rest anywhere.
        offset = 0x1F0 + where % 0x70 if where % 2 else where % len(image)
        image[offset] = value
    data = bytes(image[: len(image) - cut] if cut % 3 == 0 else image)
    try:
        elf = extract_vmlinux_bytes(data)
    except GuestFormatError:
        return
    assert elf.startswith(b"\x7fELF")


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    method=st.sampled_from(["lz4", "zstd"]),
    edits=st.lists(st.tuples(st.integers(0, 3000), st.integers(0, 255)), min_size=1, max_size=3),
)
def test_fuzz_corrupted_tool_payloads(method: str, edits: list[tuple[int, int]]) -> None:
    """Only a few examples: each one starts a decompressor process."""
    image = bytearray(TOOL_IMAGES[method])
    start = parse_bzimage_header(bytes(image)).payload_start
    for where, value in edits:
        image[start + 4 + where % (len(image) - start - 4)] = value
    try:
        elf = extract_vmlinux_bytes(bytes(image), timeout=10)
    except GuestFormatError:
        return
    assert elf.startswith(b"\x7fELF")


# ------------------------------------------------------------------------------- ELF


def test_elf_sections_of_synthetic_elf() -> None:
    sections = elf_sections(SMALL_ELF)
    assert list(sections) == [".text", ".rodata", ".BTF", ".bss", ".shstrtab"]
    assert sections[".text"] == Section(".text", 0xFFFFFFFF81000000, 64, 600, SHT_PROGBITS)
    assert sections[".bss"].size == 0x39E000 and sections[".bss"].type == SHT_NOBITS
    assert section_bytes(SMALL_ELF, ".rodata").startswith(b"Linux version")
    assert section_bytes(SMALL_ELF, ".BTF")[:4] == b"\x9f\xeb\x01\x00"
    with pytest.raises(GuestFormatError, match=r"no section named '\.debug_info'"):
        section_bytes(SMALL_ELF, ".debug_info")


def test_elf_big_endian_and_duplicates() -> None:
    elf = make_elf(
        [(".data", SHT_PROGBITS, 0x1000, b"first"), (".data", SHT_PROGBITS, 0x2000, b"second")],
        big_endian=True,
    )
    assert elf_sections(elf)[".data"].addr == 0x1000
    assert section_bytes(elf, ".data") == b"first"


def test_elf_extended_section_numbering() -> None:
    elf = bytearray(SMALL_ELF)
    shoff = struct.unpack_from("<Q", elf, 0x28)[0]
    real_count, real_strndx = struct.unpack_from("<HH", elf, 0x3C)
    struct.pack_into("<HH", elf, 0x3C, 0, 0xFFFF)
    struct.pack_into("<Q", elf, shoff + 32, real_count)  # sh_size of section 0
    struct.pack_into("<I", elf, shoff + 40, real_strndx)  # sh_link of section 0
    assert elf_sections(bytes(elf)) == elf_sections(SMALL_ELF)


def _patched(offset: int, fmt: str, value: int) -> bytes:
    return _set(SMALL_ELF, offset, fmt, value)


SHOFF = struct.unpack_from("<Q", SMALL_ELF, 0x28)[0]


@pytest.mark.parametrize(
    ("elf", "fragment"),
    [
        (b"", "no ELF magic"),
        (b"MZ" + bytes(100), "no ELF magic"),
        (_patched(4, "<B", 1), "not ELFCLASS64"),
        (_patched(5, "<B", 7), "data encoding 7"),
        (_patched(0x3A, "<H", 40), "e_shentsize 40"),
        (_patched(0x28, "<Q", 1 << 40), "past the end"),
        (_patched(0x3C, "<H", 60000), "runs past the end"),
        (_patched(0x3E, "<H", 0), "section name table index 0"),
        (_patched(0x3E, "<H", 99), "section name table index 99"),
        (_patched(SHOFF + 64 * 5 + 24, "<Q", 1 << 40), "section name table at offset"),
        (_patched(SHOFF + 64 * 1, "<I", 0xFFFFFF), "name offset 0xffffff is outside"),
        (SMALL_ELF[: SHOFF + 64 * 3], "runs past the end"),
    ],
)
def test_elf_errors(elf: bytes, fragment: str) -> None:
    with pytest.raises(GuestFormatError) as info:
        elf_sections(elf)
    assert fragment in str(info.value)


def test_section_outside_file_is_refused() -> None:
    elf = _patched(SHOFF + 64 * 1 + 32, "<Q", 1 << 30)  # .text sh_size
    assert elf_sections(elf)[".text"].size == 1 << 30
    with pytest.raises(GuestFormatError, match=r"section '\.text' at offset 0x40"):
        section_bytes(elf, ".text")


def test_elf_without_section_table() -> None:
    assert elf_sections(_patched(0x28, "<Q", 0)) == {}


@settings(max_examples=300)
@given(st.lists(st.tuples(st.integers(0, len(SMALL_ELF) - 1), st.integers(0, 255)), max_size=6))
def test_fuzz_elf_sections(edits: list[tuple[int, int]]) -> None:
    elf = bytearray(SMALL_ELF)
    for where, value in edits:
        # Aim two thirds of the edits at the ELF header and the section header table.
        if where % 3 == 0:
            elf[where % 64] = value
        elif where % 3 == 1:
            elf[(SHOFF + where) % len(elf)] = value
        else:
            elf[where] = value
    try:
        sections = elf_sections(bytes(elf))
    except GuestFormatError:
        return
    for name in sections:
        with contextlib.suppress(GuestFormatError):
            section_bytes(bytes(elf), name)


@given(st.binary(max_size=600))
def test_fuzz_elf_random_bytes(data: bytes) -> None:
    for blob in (data, b"\x7fELF\x02\x01" + data):
        with contextlib.suppress(GuestFormatError):
            elf_sections(blob)
