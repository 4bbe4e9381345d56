"""Tests of the lab kernel lookup and the cached vmlinux extraction.

Most tests point ``$VMSHIELD_CACHE`` at a temporary directory holding a small synthetic
bzImage, so they never touch the real cache; the last ones check the real cache that
``make setup`` fills and fail (never skip) when it is missing.
"""

from __future__ import annotations

import gzip
import os
import shutil
import struct
from pathlib import Path

import pytest

from vmshield.errors import GuestFormatError, LabError
from vmshield.lab import kernels
from vmshield.lab.kernels import KNOWN_KERNELS, kernel_path, vmlinux_path
from vmshield.paths import kernels_dir

REAL_KERNELS = kernels_dir()  # resolved at import, before any test redirects the cache
FAKE_ELF = b"\x7fELF\x02\x01\x01" + bytes(57) + b"synthetic kernel image " * 50


def make_bzimage(elf: bytes) -> bytes:
    """A bzImage with a gzip payload (the stream's ISIZE doubles as the appended size)."""
    payload = gzip.compress(elf, mtime=0)
    setup = bytearray(5 * 512)
    setup[0x1F1] = 4
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, 0x20F)
    struct.pack_into("<II", setup, 0x248, 0x100, len(payload))
    return bytes(setup) + b"\x90" * 0x100 + payload


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An isolated cache with a synthetic "6.1" kernel; the other two are absent."""
    monkeypatch.setenv("VMSHIELD_CACHE", str(tmp_path / "cache"))
    directory = tmp_path / "cache" / "kernels" / "6.1"
    directory.mkdir(parents=True)
    (directory / "vmlinuz").write_bytes(make_bzimage(FAKE_ELF))
    return tmp_path / "cache"


def test_known_kernels() -> None:
    assert KNOWN_KERNELS == ("5.10", "6.1", "6.12", "7.3")


def test_kernel_path_of_a_known_spec(cache: Path) -> None:
    assert kernel_path("6.1") == cache / "kernels" / "6.1" / "vmlinuz"


def test_missing_known_kernel_says_make_setup(cache: Path) -> None:
    with pytest.raises(LabError) as info:
        kernel_path("6.12")
    message = str(info.value)
    assert "kernel 6.12" in message and "make setup" in message
    assert str(cache / "kernels" / "6.12" / "vmlinuz") in message


@pytest.mark.parametrize("spec", ["6.2", "latest", "", "5.10.0"])
def test_unknown_spec(cache: Path, spec: str) -> None:
    with pytest.raises(LabError) as info:
        kernel_path(spec)
    message = str(info.value)
    assert repr(spec) in message and "make setup" in message
    assert "5.10, 6.1, 6.12, 7.3" in message


def test_kernel_path_accepts_a_file(cache: Path, tmp_path: Path) -> None:
    image = tmp_path / "bzImage"
    image.write_bytes(make_bzimage(FAKE_ELF))
    assert kernel_path(str(image)) == image
    assert kernel_path(image) == image
    with pytest.raises(LabError, match="is not a file"):
        kernel_path(str(tmp_path / "missing" / "vmlinuz"))
    with pytest.raises(LabError, match="is not a file"):
        kernel_path(tmp_path)


def test_kernel_path_relative_file(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bzImage").write_bytes(b"x")
    assert kernel_path("bzImage") == Path("bzImage")
    assert kernel_path("./bzImage") == Path("bzImage")


def test_vmlinux_path_extracts_once(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = vmlinux_path("6.1")
    assert target == cache / "kernels" / "6.1" / "vmlinux"
    assert target.read_bytes() == FAKE_ELF
    assert sorted(p.name for p in target.parent.iterdir()) == ["vmlinux", "vmlinuz"]

    def no_extraction(_path: Path) -> bytes:
        raise AssertionError("extracted again although the cached vmlinux is current")

    monkeypatch.setattr(kernels, "extract_vmlinux", no_extraction)
    assert vmlinux_path("6.1") == target


def test_vmlinux_path_refreshes_stale_or_broken_cache(cache: Path) -> None:
    directory = cache / "kernels" / "6.1"
    target = directory / "vmlinux"
    target.write_bytes(b"not an elf")
    assert vmlinux_path("6.1").read_bytes() == FAKE_ELF

    newer = FAKE_ELF + b"v2"
    (directory / "vmlinuz").write_bytes(make_bzimage(newer))
    stamp = target.stat().st_mtime
    os.utime(target, (stamp - 100, stamp - 100))  # older than the new image
    assert vmlinux_path("6.1").read_bytes() == newer


def test_vmlinux_path_names_next_to_other_images(cache: Path, tmp_path: Path) -> None:
    boot = tmp_path / "boot"
    boot.mkdir()
    (boot / "vmlinuz-6.1.0-18-amd64").write_bytes(make_bzimage(FAKE_ELF))
    (boot / "bzImage").write_bytes(make_bzimage(FAKE_ELF))
    assert vmlinux_path(boot / "vmlinuz-6.1.0-18-amd64") == boot / "vmlinux-6.1.0-18-amd64"
    assert vmlinux_path(str(boot / "bzImage")) == boot / "bzImage.vmlinux"
    assert (boot / "bzImage").read_bytes() == make_bzimage(FAKE_ELF)


def test_vmlinux_path_leaves_nothing_behind_on_failure(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = cache / "kernels" / "6.1"
    (directory / "vmlinuz").write_bytes(b"garbage")
    with pytest.raises(GuestFormatError, match="vmlinuz"):
        vmlinux_path("6.1")
    assert [p.name for p in directory.iterdir()] == ["vmlinuz"]

    (directory / "vmlinuz").write_bytes(make_bzimage(FAKE_ELF))

    def failing_replace(_src: str, _dst: Path) -> None:
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr("os.replace", failing_replace)
    with pytest.raises(LabError, match=r"cannot write the decompressed kernel to .*Read-only"):
        vmlinux_path("6.1")
    assert [p.name for p in directory.iterdir()] == ["vmlinuz"]


def test_vmlinux_path_of_a_real_kernel(cache: Path) -> None:
    """Extraction through the cache layout is byte-identical to the reference ELF."""
    source = REAL_KERNELS / "6.12"
    if not (source / "vmlinuz").is_file() or not (source / "vmlinux").is_file():
        pytest.fail(f"{source}/vmlinuz or vmlinux missing: run `make setup`", pytrace=False)
    directory = cache / "kernels" / "6.12"
    directory.mkdir()
    shutil.copyfile(source / "vmlinuz", directory / "vmlinuz")
    assert vmlinux_path("6.12").read_bytes() == (source / "vmlinux").read_bytes()


@pytest.mark.parametrize("spec", KNOWN_KERNELS)
def test_real_cache_has_every_known_kernel(spec: str) -> None:
    """``make setup`` must have fetched every known kernel; kernel_path's error says so."""
    path = kernel_path(spec)
    assert path == kernels_dir() / spec / "vmlinuz"
    assert path.read_bytes()[0x202:0x206] == b"HdrS"
