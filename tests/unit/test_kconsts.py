"""TIF_SIGPENDING read from the kernel's own code, on the real Debian kernels."""

from __future__ import annotations

import pytest

from tests.unit.test_kallsyms_synthetic import REAL_COUNTS, decode_all, real_rodata
from vmshield.guest.kconsts import tif_bit_from_code
from vmshield.guest.vmlinuz import elf_sections, section_bytes
from vmshield.paths import kernels_dir

# 2 in x86's own TIF list up to 6.x; 7.3 uses the generic TIF layout (asm-generic).
EXPECTED = {"5.10": 2, "6.1": 2, "6.12": 2, "7.3": 1}


def prologue(spec: str, name: str) -> tuple[bytes, int]:
    rodata, base = real_rodata(spec)
    _, d, addrs = decode_all(rodata, base)
    va = dict(zip(d.names, addrs, strict=True))[name]
    elf = (kernels_dir() / spec / "vmlinux").read_bytes()
    text, text_va = section_bytes(elf, ".text"), elf_sections(elf)[".text"].addr
    return text[va - text_va : va - text_va + 64], va


@pytest.mark.parametrize("spec", sorted(REAL_COUNTS))
def test_tif_sigpending_of_each_kernel(spec: str) -> None:
    code, va = prologue(spec, "signal_wake_up_state")
    assert tif_bit_from_code(code, va) == EXPECTED[spec]
    # On one CPU the kernel's alternatives turn the lock prefix into a DS prefix.
    lock = code.index(b"\xf0")
    unlocked = code[:lock] + b"\x3e" + code[lock + 1 :]
    assert tif_bit_from_code(unlocked, va) == EXPECTED[spec]


def test_no_flag_write_before_a_call_is_none() -> None:
    # endbr64; call +0; ret (a function that never sets a flag on its argument)
    code = bytes.fromhex("f30f1efae800000000c3") + b"\xf0\x80\x0f\x02"
    assert tif_bit_from_code(code, 0xFFFF_FFFF_8100_0000) is None
    assert tif_bit_from_code(b"", 0xFFFF_FFFF_8100_0000) is None
    # or [rdi+8] is some other field, not the thread-info flags
    assert tif_bit_from_code(bytes.fromhex("f0804f0802c3"), 0) is None
