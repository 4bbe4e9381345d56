"""The kernel's own patch tables (guest/kintegrity.py) on the real Debian images and on
generated malformed input.

The real images check the parser against what the kernel's own build wrote: every jump
label found by structure must sit on a nop or on a branch to exactly its own target
(a parser that reads the fields in the wrong order or relative to the wrong address would
find neither). The generated input checks that a forged table never raises and that the
text diff explains only what the sites allow.
"""

from __future__ import annotations

import struct
from functools import cache

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmshield.guest import kintegrity as ki
from vmshield.guest.vmlinuz import Section, elf_sections, section_bytes
from vmshield.lab.kernels import KNOWN_KERNELS
from vmshield.paths import kernels_dir


@cache
def image(version: str) -> tuple[bytes, dict[str, Section]]:
    path = kernels_dir() / version / "vmlinux"
    if not path.is_file():
        pytest.fail(f"kernel {version} not found at {path}: run `make setup`", pytrace=False)
    elf = path.read_bytes()
    return elf, elf_sections(elf)


@cache
def jump_table(version: str) -> tuple[list[ki.JumpEntry], bytes, int]:
    elf, secs = image(version)
    ro = secs[".rodata"]
    blob = section_bytes(elf, ".rodata")
    text = (secs[".text"].addr, secs[".exit.text"].addr + secs[".exit.text"].size)
    found = ki.find_jump_table(blob, ro.addr, text, (ro.addr, secs[".brk"].addr))
    assert found is not None, f"{version}: no jump table found by structure"
    at, size = found
    entries = ki.parse_jump_table(blob[at - ro.addr : at - ro.addr + size], at)
    return entries, section_bytes(elf, ".text"), secs[".text"].addr


@pytest.mark.parametrize("version", KNOWN_KERNELS)
def test_real_jump_labels_hold_a_nop_or_their_own_branch(version: str) -> None:
    entries, text, base = jump_table(version)
    assert len(entries) > 3000, len(entries)  # every lab kernel has thousands
    in_text = [e for e in entries if base <= e.code and e.code + 5 <= base + len(text)]
    assert len(in_text) > 0.9 * len(entries)
    for e in in_text:
        site = next(ki.jump_sites([e]))
        now = text[e.code - base : e.code - base + 5]
        # The image's bytes must be something the site may hold; a jmp to another place
        # must not be (the branch target is what makes a foreign redirect visible).
        assert ki.jump_form(site, now), (version, hex(e.code), now.hex())
        if now[0] == ki.JMP32:
            evil = now[:1] + struct.pack("<i", struct.unpack("<i", now[1:])[0] + 16)
            assert not ki.allowed_at(site, now, evil)


@pytest.mark.parametrize("version", KNOWN_KERNELS)
def test_a_patched_function_start_is_foreign_but_a_flipped_label_is_not(version: str) -> None:
    entries, text, base = jump_table(version)
    e = next(e for e in entries if base <= e.code < base + len(text) - 64)
    lo = e.code - base - 16
    ref = text[lo : lo + 64]
    sites = sorted(ki.jump_sites(entries), key=lambda s: s.address)
    # The kernel flips the label: jmp rel32 to its own target.
    flipped = bytearray(ref)
    rel = e.target - (e.code + 5)
    flipped[16:21] = b"\xe9" + struct.pack("<i", rel)
    assert ki.foreign_changes(ref, bytes(flipped), base + lo, sites) == []
    # A rootkit overwrites bytes next to it: foreign, with the old and new bytes.
    evil = bytearray(ref)
    evil[0:5] = b"\xe9\x00\x00\x00\x10"
    changes = ki.foreign_changes(ref, bytes(evil), base + lo, sites)
    assert len(changes) == 1 and changes[0].address >= base + lo
    assert changes[0].new != changes[0].old


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=512), st.integers(0, (1 << 64) - 1))
def test_forged_tables_never_raise(blob: bytes, base: int) -> None:
    for e in ki.parse_jump_table(blob, base):
        assert 0 <= e.code < 1 << 64 and 0 <= e.key < 1 << 64
    ki.parse_static_call_sites(blob, base)
    ki.find_jump_table(blob, base, (0, 1 << 64), (0, 1 << 64), min_run=1)


@settings(max_examples=200, deadline=None)
@given(
    st.binary(min_size=1, max_size=256),
    st.lists(st.tuples(st.integers(0, 255), st.integers(0, 255)), max_size=20),
    st.lists(st.tuples(st.integers(0, 255), st.sampled_from(["jump_label", "ftrace", "kprobe",
                                                                "static_call", "bogus"])),
             max_size=8),
)  # fmt: skip
def test_changes_outside_sites_are_always_reported(
    ref: bytes, edits: list[tuple[int, int]], raw_sites: list[tuple[int, str]]
) -> None:
    base = 0xFFFF_FFFF_8100_0000
    now = bytearray(ref)
    for pos, val in edits:
        now[pos % len(ref)] = val
    sites = sorted(
        (ki.Site(base + a, 5, kind, base) for a, kind in raw_sites), key=lambda s: s.address
    )
    changes = ki.foreign_changes(ref, bytes(now), base, sites)
    reported = {c.address + i for c in changes for i in range(len(c.new))}
    for i, (a, b) in enumerate(zip(ref, now, strict=True)):
        covered = any(s.address <= base + i < s.address + s.size for s in sites)
        if a != b and not covered:
            assert base + i in reported
    for c in changes:  # old/new bytes are the real ones
        lo = c.address - base
        assert c.old == ref[lo : lo + len(c.old)] and c.new == bytes(now[lo : lo + len(c.new)])


def test_two_adjacent_two_byte_labels_flip_together() -> None:
    """normalize_rt_tasks on 6.1 has two 2-byte jump labels side by side: both flipping
    at once (nop2 nop2 -> jmp8 jmp8) is the kernel's own doing, seen in the soak."""
    base = 0xFFFF_FFFF_8100_0000
    ref = b"\x90" * 3 + b"\x66\x90\x66\x90" + b"\x90" * 16
    a, b = base + 3, base + 5
    raw = [ki.Site(a, 5, "jump_label", a + 2 + 0x54), ki.Site(b, 5, "jump_label", b + 2 + 0x45)]
    sites = ki.sized_jump_sites(raw, ref, base)
    assert [s.size for s in sites] == [2, 2]
    now = ref[:3] + b"\xeb\x54\xeb\x45" + ref[7:]
    assert ki.foreign_changes(ref, now, base, sites) == []
    # Either label jumping elsewhere is still foreign.
    bad = ref[:3] + b"\xeb\x54\xeb\x46" + ref[7:]
    assert ki.foreign_changes(ref, bad, base, sites) != []
