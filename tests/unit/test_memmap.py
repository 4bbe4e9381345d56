"""Tests of the guest RAM layout parser (``info mtree -f``).

The 512 MiB q35 fixture was captured from QEMU; the >4 GiB layout is written by hand in
the same format (``pc.ram`` split by the ram-below-4g / ram-above-4g aliases, which the
flattened view shows as the aliased block with its offset). Hypothesis holds the parser
to its contract on any text: a list of ranges or a HypervisorError.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmshield.errors import HypervisorError
from vmshield.hv.memmap import RamRange, parse_flatview

FIXTURES = Path(__file__).parent / "fixtures"

Q35_8G = """\
FlatView #0
 AS "cpu-smm-0", root: memory
 AS "cpu-smm-1", root: memory
 Root memory region: memory
  0000000000000000-000000000009ffff (prio 0, ram): pc.ram
  00000000000a0000-00000000000bffff (prio 0, ram): pc.ram @00000000000a0000
  00000000000c0000-00000000000dffff (prio 1, rom): pc.rom
  00000000000e0000-00000000000fffff (prio 1, rom): isa-bios
  0000000000100000-000000007fffffff (prio 0, ram): pc.ram @0000000000100000
  00000000fffc0000-00000000ffffffff (prio 0, rom): pc.bios
  0000000100000000-000000027fffffff (prio 0, ram): pc.ram @0000000080000000

FlatView #1
 AS "mch", root: bus master container
 Root memory region: (none)
  No rendered FlatView

FlatView #2
 AS "memory", root: system
 AS "cpu-memory-0", root: system
 AS "cpu-memory-1", root: system
 AS "ich9-ahci", root: bus master container
 Root memory region: system
  0000000000000000-000000000009ffff (prio 0, ram): pc.ram
  00000000000a0000-00000000000bffff (prio 1, i/o): vga-lowmem
  00000000000c0000-00000000000dffff (prio 1, rom): pc.rom
  00000000000e0000-00000000000fffff (prio 1, rom): isa-bios
  0000000000100000-000000007fffffff (prio 0, ram): pc.ram @0000000000100000
  00000000b0000000-00000000bfffffff (prio 0, i/o): pcie-mmcfg-mmio
  00000000fd000000-00000000fdffffff (prio 1, ram): vga.vram
  00000000febf0000-00000000febf0fff (prio 1, i/o): virtio-pci-common-virtio-net
  00000000fec00000-00000000fec00fff (prio 0, i/o): ioapic
  00000000fed00000-00000000fed003ff (prio 0, i/o): hpet
  00000000fee00000-00000000feefffff (prio 4096, i/o): apic-msi
  00000000ffc00000-00000000ffffffff (prio 0, romd): system.flash0
  0000000100000000-000000027fffffff (prio 0, ram): pc.ram @0000000080000000
  0000000280000000-00000002ffffffff (prio 0, i/o): pci-hole64

FlatView #3
 AS "I/O", root: io
 Root memory region: io
  0000000000000000-0000000000000007 (prio 0, i/o): dma-chan
"""

# The same machine's non-flattened tree (`info mtree` without -f): aliases, no FlatView.
Q35_8G_TREE = """\
address-space: memory
  0000000000000000-ffffffffffffffff (prio 0, i/o): system
    0000000000000000-000000007fffffff (prio 0, ram): alias ram-below-4g @pc.ram \
0000000000000000-000000007fffffff
    0000000100000000-000000027fffffff (prio 0, ram): alias ram-above-4g @pc.ram \
0000000080000000-00000001ffffffff

memory-region: pc.ram
  0000000000000000-00000001ffffffff (prio 0, ram): pc.ram
"""


def test_captured_q35_512m() -> None:
    text = (FIXTURES / "mtree-q35-512m.txt").read_text()
    ranges = parse_flatview(text)
    assert ranges == [
        RamRange(0, 0xA0000, "ram", 0),
        RamRange(0xC0000, 0x2000_0000, "ram", 0xC0000),
    ]
    assert [r.size for r in ranges] == [0xA0000, 0x2000_0000 - 0xC0000]


def test_q35_above_4g() -> None:
    assert parse_flatview(Q35_8G) == [
        RamRange(0, 0xA0000, "pc.ram", 0),
        RamRange(0x10_0000, 0x8000_0000, "pc.ram", 0x10_0000),
        RamRange(0x1_0000_0000, 0x2_8000_0000, "pc.ram", 0x8000_0000),
    ]


def test_only_the_memory_address_space_counts() -> None:
    # FlatView #0 (SMM) maps 0xa0000-0xbffff to RAM as well; it must not leak in.
    ranges = parse_flatview(Q35_8G)
    assert all(not (r.start < 0xC0000 and r.end > 0xA0000) for r in ranges)


def test_memory_backend_name() -> None:
    text = """\
FlatView #0
 AS "memory", root: system
 Root memory region: system
  0000000000000000-000000000009ffff (prio 0, ram): mem0
  00000000000c0000-00000000000fffff (prio 0, rom): mem0 @00000000000c0000
  0000000000100000-000000003fffffff (prio 0, ram): mem0 @0000000000100000
  00000000fd000000-00000000fdffffff (prio 1, ram): vga.vram
"""
    assert parse_flatview(text) == [
        RamRange(0, 0xA0000, "mem0", 0),
        RamRange(0xC0000, 0x4000_0000, "mem0", 0xC0000),
    ]


def test_adjacent_ranges_merge_only_when_offsets_continue() -> None:
    text = """\
FlatView #0
 AS "memory", root: system
  0000000000000000-0000000000000fff (prio 0, ram): a
  0000000000001000-0000000000001fff (prio 0, ram): a @0000000000001000
  0000000000002000-0000000000002fff (prio 0, ram): a @0000000000009000
  0000000000003000-0000000000003fff (prio 0, ram): b @000000000000a000
  0000000000004000-0000000000004fff (prio 0, ram): a @000000000000a000
"""
    assert parse_flatview(text) == [
        RamRange(0, 0x2000, "a", 0),
        RamRange(0x2000, 0x3000, "a", 0x9000),
        RamRange(0x3000, 0x4000, "b", 0xA000),
        RamRange(0x4000, 0x5000, "a", 0xA000),
    ]


@pytest.mark.parametrize(
    "text",
    [
        "",
        "FlatView #0\n",
        Q35_8G_TREE,
        'FlatView #0\n AS "I/O", root: io\n  0000-0fff (prio 0, ram): ram\n',
        'FlatView #0\n AS "memory", root: system\n  00000000-000fffff (prio 0, i/o): ram\n',
        'FlatView #0\n AS "memory", root: system\n  00000000-000fffff (prio 1, ram): vga.vram\n',
        "  0000000000000000-000000000009ffff (prio 0, ram): pc.ram\n",  # no AS "memory"
    ],
)
def test_no_ram_is_an_error(text: str) -> None:
    with pytest.raises(HypervisorError, match="no guest RAM"):
        parse_flatview(text)


def test_too_long_output() -> None:
    text = 'FlatView #0\n AS "I/O", root: io\n' + "x\n" * 100_001
    with pytest.raises(HypervisorError, match="too long"):
        parse_flatview(text)


hex_num = st.integers(0, (1 << 64) - 1).map(lambda v: f"{v:016x}")
mtree_line = st.one_of(
    st.builds(
        lambda a, b, prio, kind, name, off: (
            f"  {a}-{b} (prio {prio}, {kind}): {name}" + (f" @{off}" if off else "")
        ),
        hex_num,
        hex_num,
        st.integers(-5, 5000),
        st.sampled_from(["ram", "rom", "i/o", "romd", "ramd", "ram device", "RAM"]),
        st.sampled_from(["ram", "pc.ram", "mem0", "vga.vram", "pc.bios", "a@b", "x y"]),
        st.one_of(st.none(), hex_num),
    ),
    st.sampled_from(
        [
            "FlatView #0",
            "FlatView #7",
            ' AS "memory", root: system',
            ' AS "cpu-smm-0", root: memory',
            ' AS "memory"',
            " Root memory region: system",
            "  No rendered FlatView",
            "",
        ]
    ),
    st.text(max_size=80),
)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=2000), st.lists(mtree_line, max_size=40).map("\n".join)))
def test_any_text_gives_ranges_or_hypervisor_error(text: str) -> None:
    try:
        ranges = parse_flatview(text)
    except HypervisorError:
        return
    assert ranges
    for r in ranges:
        assert isinstance(r, RamRange)
        assert r.block and r.start >= 0 and r.offset >= 0
