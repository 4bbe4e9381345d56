"""Tests of the x86-64 page walker over synthetic page tables.

The tables are built here, entry by entry, inside a bytearray that stands for guest RAM;
the read function raises MemoryAccessError outside it like the real guest memory does.
The hypothesis tests fill tables with hostile contents (entries pointing back at their
own table, at other tables, outside RAM, with any flag bits) and hold the walker to its
contract: a result or a TranslationError, and little work.
"""

from __future__ import annotations

import random
import struct
import time

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from vmshield.errors import MemoryAccessError, TranslationError
from vmshield.guest.paging import PAGE, Mapping, PageWalker

P, RW, US, PS, NX = 1, 1 << 1, 1 << 2, 1 << 7, 1 << 63
KB4, MB2, GB1 = 1 << 12, 1 << 21, 1 << 30
SIZE_SHIFT = {KB4: 12, MB2: 21, GB1: 30}


class ReadBudgetExceeded(Exception):
    """Raised by the test RAM when a walk reads more than it may (not a vmshield error,
    so the walker cannot swallow it)."""


class Ram:
    """Guest-physical memory with a bump allocator for page-table pages."""

    def __init__(self, size: int, first_free: int = 0x1000) -> None:
        self.mem = bytearray(size)
        self.next_free = first_free
        self.reads = 0
        self.budget: int | None = None

    def read(self, pa: int, n: int) -> bytes:
        self.reads += 1
        if self.budget is not None and self.reads > self.budget:
            raise ReadBudgetExceeded(f"more than {self.budget} physical reads")
        if pa < 0 or n < 0 or pa + n > len(self.mem):
            raise MemoryAccessError(f"{pa:#x}+{n:#x} is outside guest RAM")
        return bytes(self.mem[pa : pa + n])

    def alloc(self) -> int:
        pa = self.next_free
        self.next_free += PAGE
        assert self.next_free <= len(self.mem), "test RAM too small"
        return pa

    def u64(self, pa: int) -> int:
        return int(struct.unpack_from("<Q", self.mem, pa)[0])

    def set_u64(self, pa: int, value: int) -> None:
        struct.pack_into("<Q", self.mem, pa, value)


class Tables:
    """Builds one address space (4- or 5-level) in a Ram."""

    def __init__(self, ram: Ram, la57: bool = False, table_flags: int = P | RW | US) -> None:
        self.ram = ram
        self.la57 = la57
        self.shifts = [48, 39, 30, 21, 12] if la57 else [39, 30, 21, 12]
        self.table_flags = table_flags
        self.cr3 = ram.alloc()

    def walker(self) -> PageWalker:
        return PageWalker(self.ram.read, self.cr3 | 0x18, la57=self.la57)  # PCID bits ignored

    def entry_addr(self, va: int, shift: int, create: bool = True) -> int:
        """Address of the entry for ``va`` at the level indexed by ``shift``."""
        table = self.cr3
        for s in self.shifts:
            slot = table + ((va >> s) & 0x1FF) * 8
            if s == shift:
                return slot
            e = self.ram.u64(slot)
            if not e & P:
                if not create:
                    raise KeyError(hex(va))
                e = self.ram.alloc() | self.table_flags
                self.ram.set_u64(slot, e)
            table = e & 0x000F_FFFF_FFFF_F000
        raise AssertionError(shift)

    def map(self, va: int, pa: int, size: int = KB4, flags: int = P | RW) -> None:
        assert va % size == 0 and pa % size == 0
        leaf = pa | flags | (PS if size != KB4 else 0)
        self.ram.set_u64(self.entry_addr(va, SIZE_SHIFT[size]), leaf)

    def unmap(self, va: int, size: int = KB4) -> None:
        self.ram.set_u64(self.entry_addr(va, SIZE_SHIFT[size], create=False), 0)


# ------------------------------------------------------------------- single lookups


def test_4k_translation_and_permissions() -> None:
    ram = Ram(1 << 20)
    t = Tables(ram)
    t.map(0x40_0000, 0x8_0000, flags=P | RW | US)
    t.map(0x40_1000, 0x9_0000, flags=P | US | NX)
    w = t.walker()
    assert w.translate(0x40_0123) == 0x8_0123
    assert w.lookup(0x40_0FFF) == Mapping(0x40_0000, 0x8_0000, KB4, True, True, False)
    assert w.lookup(0x40_1000) == Mapping(0x40_1000, 0x9_0000, KB4, False, True, True)
    assert w.translate(0x40_1FFF) == 0x9_0FFF


def test_2m_and_1g_leaves_in_the_kernel_half() -> None:
    ram = Ram(1 << 20)
    t = Tables(ram)
    t.map(0xFFFF_FFFF_8100_0000, 0x3C0_0000, MB2, P | RW)
    t.map(0xFFFF_8880_0000_0000, 0, GB1, P | RW | NX)
    # the PAT bit (bit 12) of a large leaf is not part of the frame address
    t.map(0xFFFF_FFFF_8120_0000, 0x400_0000, MB2, P | (1 << 12))
    w = t.walker()
    assert w.translate(0xFFFF_FFFF_8112_3456) == 0x3D2_3456
    assert w.lookup(0xFFFF_FFFF_811F_FFFF) == Mapping(
        0xFFFF_FFFF_8100_0000, 0x3C0_0000, MB2, True, False, False
    )
    assert w.translate(0xFFFF_8880_1234_5678) == 0x1234_5678
    assert w.lookup(0xFFFF_8880_3FFF_FFFF).size == GB1
    assert w.translate(0xFFFF_FFFF_8120_0010) == 0x400_0010
    with pytest.raises(TranslationError):
        w.lookup(0xFFFF_8880_4000_0000)  # the next 1G is not mapped


def test_permissions_combine_over_all_levels() -> None:
    ram = Ram(1 << 20)
    t = Tables(ram, table_flags=P | US)  # read-only tables above the leaf
    t.map(0x7000_0000, 0x5000, flags=P | RW | US)
    w = t.walker()
    m = w.lookup(0x7000_0000)
    assert (m.writable, m.user, m.nx) == (False, True, False)
    pdpt_entry = t.entry_addr(0x7000_0000, 30)
    ram.set_u64(pdpt_entry, ram.u64(pdpt_entry) | NX)
    w.flush()
    assert w.lookup(0x7000_0000).nx
    pml4_entry = t.entry_addr(0x7000_0000, 39)
    ram.set_u64(pml4_entry, ram.u64(pml4_entry) & ~US)
    w.flush()
    assert not w.lookup(0x7000_0000).user


def test_five_level_lower_and_upper_half() -> None:
    ram = Ram(1 << 20)
    t = Tables(ram, la57=True)
    t.map(0xFF11_0000_0000_0000, 0, GB1, P | RW | NX)  # page_offset_base with LA57
    t.map(0x00FF_FFFF_FFFF_F000, 0x7000, KB4, P | RW | US)  # top of the 57-bit user half
    t.map(0xFFFF_FFFF_8100_0000, 0x20_0000, MB2, P)
    w = t.walker()
    assert w.va_bits == 57
    assert w.translate(0xFF11_0000_0ABC_DEF0) == 0xABC_DEF0
    assert w.translate(0x00FF_FFFF_FFFF_FFF8) == 0x7FF8
    assert w.lookup(0xFFFF_FFFF_811F_FFFF) == Mapping(
        0xFFFF_FFFF_8100_0000, 0x20_0000, MB2, False, False, False
    )
    # the same tables walked as 4-level do not give these translations
    four = PageWalker(ram.read, t.cr3, la57=False)
    with pytest.raises(TranslationError):
        four.translate(0xFF11_0000_0ABC_DEF0)  # not canonical with 48 bits


@pytest.mark.parametrize(
    ("la57", "va", "ok"),
    [
        (False, 0, True),
        (False, 0x0000_7FFF_FFFF_FFFF, True),
        (False, 0x0000_8000_0000_0000, False),
        (False, 0xFFFF_7FFF_FFFF_FFFF, False),
        (False, 0xFFFF_8000_0000_0000, True),
        (False, 0xFF11_0000_0000_0000, False),
        (True, 0x0000_8000_0000_0000, True),
        (True, 0x00FF_FFFF_FFFF_FFFF, True),
        (True, 0x0100_0000_0000_0000, False),
        (True, 0xFEFF_FFFF_FFFF_FFFF, False),
        (True, 0xFF00_0000_0000_0000, True),
        (True, 0xFF11_0000_0000_0000, True),
        (True, 0xFFFF_FFFF_FFFF_FFFF, True),
    ],
)
def test_canonical(la57: bool, va: int, ok: bool) -> None:
    w = PageWalker(Ram(PAGE * 2).read, 0x1000, la57=la57)
    assert w.canonical(va) is ok
    if not ok:
        with pytest.raises(TranslationError, match="canonical"):
            w.lookup(va)


@pytest.mark.parametrize("va", [-1, -PAGE, 1 << 64, (1 << 64) + 0x1000, 1 << 80])
def test_addresses_outside_64_bits(va: int) -> None:
    w = PageWalker(Ram(PAGE * 2).read, 0x1000)
    with pytest.raises(TranslationError):
        w.lookup(va)
    with pytest.raises(TranslationError):
        w.read(va, 8)


@pytest.mark.parametrize("shift", [39, 30, 21, 12])
def test_not_present_at_each_level(shift: int) -> None:
    ram = Ram(1 << 20)
    t = Tables(ram)
    va = 0xFFFF_C900_0012_3000
    t.map(va, 0x6_0000)
    w = t.walker()
    assert w.translate(va) == 0x6_0000
    slot = t.entry_addr(va, shift)
    ram.set_u64(slot, ram.u64(slot) & ~P)  # other bits stay: only P matters
    w.flush()
    with pytest.raises(TranslationError, match="not mapped"):
        w.lookup(va)
    with pytest.raises(TranslationError):
        w.read(va, 1)


def test_tables_and_frames_outside_ram() -> None:
    ram = Ram(1 << 20)
    t = Tables(ram)
    t.map(0x1000_0000, 0x7_0000)
    t.map(0x2000_0000, 0x40_0000_0000)  # a frame far outside the 1 MiB of RAM
    w = t.walker()
    assert w.translate(0x2000_0010) == 0x40_0000_0010  # translating needs no frame
    with pytest.raises(TranslationError, match="outside guest RAM"):
        w.read(0x2000_0000, 4)
    pd_entry = t.entry_addr(0x1000_0000, 21)
    ram.set_u64(pd_entry, 0xF_FFFF_FFFF_F000 | P | RW)  # a page table past the end of RAM
    w.flush()
    with pytest.raises(TranslationError, match="outside guest RAM"):
        w.lookup(0x1000_0000)
    # a root outside RAM
    with pytest.raises(TranslationError):
        PageWalker(ram.read, 0x10_0000_0000).lookup(0)


def test_pml4_entry_with_ps_bit_is_rejected() -> None:
    # Regression: bit 7 (PS) of a PML4 entry is reserved (the CPU faults with RSVD). Up
    # to 221632a the check meant to reject it in PageWalker._walk was dead code, and the
    # walk went on into the entry as if it were a table, returning a mapping.
    ram = Ram(1 << 20)
    t = Tables(ram)
    t.map(0x4000_0000, 0x9000)
    slot = t.entry_addr(0x4000_0000, 39)
    ram.set_u64(slot, ram.u64(slot) | PS)
    with pytest.raises(TranslationError):
        t.walker().lookup(0x4000_0000)


# --------------------------------------------------------------------------- reads


def test_read_across_pages_into_scattered_frames() -> None:
    ram = Ram(4 << 20)
    t = Tables(ram)
    base = 0xFFFF_C900_0000_0000
    frames = [0x17_0000, 0x3_0000, 0x2A_0000, 0x11_0000]
    expected = bytearray()
    for i, frame in enumerate(frames):
        t.map(base + i * PAGE, frame)
        data = bytes((i * 37 + j) & 0xFF for j in range(PAGE))
        ram.mem[frame : frame + PAGE] = data
        expected += data
    w = t.walker()
    assert w.read(base, 4 * PAGE) == bytes(expected)
    assert w.read(base + 4000, 5000) == bytes(expected[4000:9000])
    assert w.read(base + PAGE - 3, 6) == bytes(expected[PAGE - 3 : PAGE + 3])
    assert w.read(base + 5, 0) == b""
    assert w.read_u64(base + PAGE - 4) == int.from_bytes(expected[PAGE - 4 : PAGE + 4], "little")
    assert w.read_u32(base + 2 * PAGE - 2) == int.from_bytes(
        expected[2 * PAGE - 2 : 2 * PAGE + 2], "little"
    )
    with pytest.raises(TranslationError, match="not mapped"):
        w.read(base + 3 * PAGE + 100, PAGE)  # runs into the unmapped fifth page


def test_read_from_4k_page_into_2m_page() -> None:
    ram = Ram(4 << 20)
    t = Tables(ram)
    t.map(0xFFFF_FFFF_811F_F000, 0x5000)  # last 4K page below a 2M boundary
    t.map(0xFFFF_FFFF_8120_0000, 0x20_0000, MB2)
    ram.mem[0x5FF0:0x6000] = b"A" * 16
    ram.mem[0x20_0000:0x20_0010] = b"B" * 16
    w = t.walker()
    assert w.read(0xFFFF_FFFF_811F_FFF0, 32) == b"A" * 16 + b"B" * 16
    assert w.read(0xFFFF_FFFF_8120_0000 + MB2 - 8, 8) == bytes(8)
    with pytest.raises(TranslationError):
        w.read(0xFFFF_FFFF_8120_0000 + MB2 - 8, 9)


@pytest.mark.parametrize("size", [-1, (64 << 20) + 1, 1 << 40])
def test_read_rejects_bad_sizes(size: int) -> None:
    ram = Ram(1 << 20)
    t = Tables(ram)
    t.map(0x1000, 0x1_0000)
    with pytest.raises(TranslationError, match="bad read size"):
        t.walker().read(0x1000, size)


# ------------------------------------------------------------------------ mappings


def build_mixed_space(la57: bool) -> tuple[Tables, list[Mapping]]:
    """User pages, a 1G direct map, kernel text in 2M pages and vmalloc 4K pages."""
    ram = Ram(1 << 20)
    t = Tables(ram, la57=la57)
    direct = 0xFF11_0000_0000_0000 if la57 else 0xFFFF_8880_0000_0000
    vmalloc = 0xFFA0_0000_0000_0000 if la57 else 0xFFFF_C900_0000_0000
    want = [
        Mapping(0x40_0000, 0x10_0000, KB4, False, True, False),
        Mapping(0x40_1000, 0x10_1000, KB4, True, True, True),
        Mapping(
            0x7FFF_F000_0000 if not la57 else 0xFF_FFFF_F000_0000, 0x2_0000, KB4, True, True, True
        ),
        Mapping(direct, 0, GB1, True, False, True),
        Mapping(direct + GB1, GB1, GB1, True, False, True),
        Mapping(vmalloc, 0x33_0000, KB4, True, False, True),
        Mapping(vmalloc + 0x20_0000, 0x34_0000, KB4, True, False, True),
        Mapping(0xFFFF_FFFF_8100_0000, 0x100_0000, MB2, False, False, False),
        Mapping(0xFFFF_FFFF_8120_0000, 0x120_0000, MB2, False, False, False),
        Mapping(0xFFFF_FFFF_8140_0000, 0x140_0000, MB2, True, False, True),
        Mapping(0xFFFF_FFFF_FF5F_F000, 0xFEE0_0000, KB4, True, False, True),
    ]
    for m in reversed(want):  # build order must not matter
        flags = P | (RW if m.writable else 0) | (US if m.user else 0) | (NX if m.nx else 0)
        t.map(m.va, m.pa, m.size, flags)
    return t, want


@pytest.mark.parametrize("la57", [False, True])
def test_mappings_enumerates_everything_in_address_order(la57: bool) -> None:
    t, want = build_mixed_space(la57)
    w = t.walker()
    got = list(w.mappings(0, 1 << 64))
    assert got == want
    assert [m.va for m in got] == sorted(m.va for m in got)
    for m in got:
        assert w.lookup(m.va) == m
        assert w.lookup(m.va + m.size - 1) == m


@pytest.mark.parametrize("la57", [False, True])
def test_mappings_range_bounds(la57: bool) -> None:
    t, want = build_mixed_space(la57)
    w = t.walker()
    kernel = [m for m in want if m.va >= 0xFFFF_FFFF_8000_0000]
    assert list(w.mappings(0xFFFF_FFFF_8000_0000, 1 << 64)) == kernel
    # a range that starts inside a 2M page and ends inside another includes both
    text = list(w.mappings(0xFFFF_FFFF_8110_0000, 0xFFFF_FFFF_8120_0001))
    assert [m.va for m in text] == [0xFFFF_FFFF_8100_0000, 0xFFFF_FFFF_8120_0000]
    # end is exclusive
    assert list(w.mappings(0xFFFF_FFFF_8100_0000, 0xFFFF_FFFF_8120_0000)) == [kernel[0]]
    assert list(w.mappings(0, 0x40_0000)) == []
    assert list(w.mappings(0x40_0000, 0x40_0001)) == [want[0]]
    lower = [m for m in want if m.va < 1 << 63]
    assert list(w.mappings(0, 1 << 63)) == lower
    assert list(w.mappings(1 << 63, 1 << 64)) == [m for m in want if m.va >= 1 << 63]
    assert list(w.mappings(5, 5)) == []


def test_mappings_limit() -> None:
    ram = Ram(1 << 20)
    t = Tables(ram)
    for i in range(10):
        t.map(0xFFFF_C900_0000_0000 + i * PAGE, 0x1_0000 + i * PAGE)
    w = t.walker()
    assert len(list(w.mappings(0, 1 << 64, limit=10))) == 10
    got: list[Mapping] = []
    with pytest.raises(TranslationError, match="more than 4 mappings"):
        for m in w.mappings(0, 1 << 64, limit=4):
            got.append(m)
    assert [m.va for m in got] == [0xFFFF_C900_0000_0000 + i * PAGE for i in range(4)]


def test_mappings_permissions_agree_with_lookup() -> None:
    # Regression: up to 221632a mappings() reported the leaf entry's own RW/US/NX bits,
    # while lookup() combines them over every level (RW and US only if set at all
    # levels, NX if set at any), so a page under a read-only or NX entry was reported
    # writable and executable.
    ram = Ram(1 << 20)
    t = Tables(ram, table_flags=P | US)  # intermediate tables are read-only
    t.map(0x60_0000, 0x1_0000, flags=P | RW | US)
    pd_entry = t.entry_addr(0x60_0000, 21)
    ram.set_u64(pd_entry, ram.u64(pd_entry) | NX)
    w = t.walker()
    (m,) = w.mappings(0, 1 << 47)
    assert m == w.lookup(0x60_0000)


def test_mappings_skips_tables_outside_ram() -> None:
    ram = Ram(1 << 20)
    t = Tables(ram)
    t.map(0x1000, 0x8000)
    t.map(0x4000_0000, 0x9000)
    slot = t.entry_addr(0x4000_0000, 30)
    ram.set_u64(slot, 0x7_0000_0000 | P | RW)
    assert [m.va for m in t.walker().mappings(0, 1 << 47)] == [0x1000]


def test_mappings_fan_out_without_leaves_is_bounded() -> None:
    # Regression: up to 221632a `limit` only counted leaves. Three page-table pages
    # whose 512 entries all point at the next one, and a last one with no present entry,
    # made mappings() read 512*512*512 page tables without ever yielding or raising: a
    # guest-controlled hang.
    ram = Ram(16 * PAGE)
    root, pdpt, pd, pt = 0x1000, 0x2000, 0x3000, 0x4000
    for table, nxt in ((root, pdpt), (pdpt, pd), (pd, pt)):
        ram.mem[table : table + PAGE] = struct.pack("<Q", nxt | P | RW) * 512
    ram.budget = 10_000
    w = PageWalker(ram.read, root)
    try:
        got = list(w.mappings(0, 1 << 64, limit=16))
    except TranslationError:
        got = []
    except ReadBudgetExceeded:
        pytest.fail("mappings() kept reading page tables of a tree without leaves")
    assert got == []


# ----------------------------------------------------------------------------- TLB


def test_tlb_flush_sees_changed_tables() -> None:
    ram = Ram(1 << 20)
    t = Tables(ram)
    va = 0xFFFF_C900_0001_0000
    t.map(va, 0x2_0000)
    w = t.walker()
    assert w.translate(va + 8) == 0x2_0008
    reads = ram.reads
    assert w.translate(va + 16) == 0x2_0010
    assert ram.reads == reads  # a cached 4K translation costs no table read
    t.map(va, 0x5_0000)  # the guest remaps the page
    assert w.translate(va + 8) in (0x2_0008, 0x5_0008)  # may be stale until a flush
    w.flush()
    assert w.translate(va + 8) == 0x5_0008
    assert w.lookup(va) == t.walker().lookup(va)
    t.unmap(va)
    w.flush()
    with pytest.raises(TranslationError):
        w.translate(va)
    t.map(va, 0x6_0000, flags=P | RW | NX)
    w.flush()
    assert w.lookup(va) == Mapping(va, 0x6_0000, KB4, True, False, True)


@pytest.mark.parametrize(
    ("size", "va"), [(MB2, 0xFFFF_FFFF_8120_0000), (GB1, 0xFFFF_8880_4000_0000)]
)
def test_tlb_flush_with_large_pages(size: int, va: int) -> None:
    ram = Ram(1 << 20)
    t = Tables(ram)
    t.map(va, 4 * size, size)
    w = t.walker()
    assert w.translate(va + 0x1234) == 4 * size + 0x1234
    t.map(va, 8 * size, size)
    assert w.translate(va + 0x1234) in (4 * size + 0x1234, 8 * size + 0x1234)
    w.flush()
    assert w.translate(va + size - 1) == 9 * size - 1
    # split the large page into 4K pages: the first now goes elsewhere, the next is absent
    t.unmap(va, size)
    t.map(va, 0x7000)
    w.flush()
    assert w.lookup(va + 8) == Mapping(va, 0x7000, KB4, True, False, False)
    with pytest.raises(TranslationError):
        w.lookup(va + KB4)


def test_tlb_agrees_with_a_fresh_walk_everywhere() -> None:
    t, want = build_mixed_space(False)
    w = t.walker()
    rng = random.Random(7)
    probes = [m.va + rng.randrange(m.size) for m in want for _ in range(4)]
    for va in probes + probes:  # the second round hits the cache
        assert w.lookup(va) == t.walker().lookup(va)
        assert w.translate(va) == t.walker().translate(va)


# ---------------------------------------------------------------------- hypothesis

RAM_PAGES = 8
# frames 0..7 are RAM pages, 8.. lie outside RAM
entry_values = st.one_of(
    st.just(0),
    st.builds(
        lambda frame, flags, nx: frame << 12 | flags | P | (NX if nx else 0),
        st.integers(0, RAM_PAGES + 2),
        st.integers(0, 0xFFF),
        st.booleans(),
    ),
    st.builds(lambda frame: frame << 12 | P | RW | PS, st.integers(0, RAM_PAGES + 2)),
    st.integers(0, (1 << 64) - 1),
)


def hostile_ram(palette: list[int], modes: list[int], seed: int, chain: int) -> Ram:
    """RAM_PAGES pages of entries: a whole page of one entry of ``palette``, mixed entries,
    a few entries in a sea of zeros, a page pointing only at the next page (dense fan-out
    chains) or only at itself (cycles). The first ``chain`` pages point at the next one."""
    ram = Ram(RAM_PAGES * PAGE)
    rng = random.Random(seed)
    modes = [3] * chain + modes[chain:]
    for page, mode in enumerate(modes):
        if mode == 0:
            entries = [rng.choice(palette)] * 512
        elif mode == 1:
            entries = [rng.choice(palette) for _ in range(512)]
        elif mode == 2:
            entries = [0] * 512
            for _ in range(rng.randrange(1, 8)):
                entries[rng.randrange(512)] = rng.choice(palette)
        elif mode == 3:  # every entry points at the next page (the last: outside RAM)
            entries = [(page + 1) << 12 | P | RW] * 512
        else:  # every entry points back at its own page
            entries = [page << 12 | P | RW | US] * 512
        ram.mem[page * PAGE : (page + 1) * PAGE] = struct.pack("<512Q", *entries)
    return ram


hostile = dict(
    palette=st.lists(entry_values, min_size=1, max_size=6),
    modes=st.lists(st.integers(0, 4), min_size=RAM_PAGES, max_size=RAM_PAGES),
    seed=st.integers(0, 2**32),
    chain=st.integers(0, 4),
    cr3=st.one_of(st.just(0), st.integers(0, RAM_PAGES + 1).map(lambda f: f << 12)),
    la57=st.booleans(),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    **hostile,
    vas=st.lists(
        st.one_of(
            st.integers(0, (1 << 64) - 1),
            st.integers(0, (1 << 47) - 1),
            st.integers((1 << 64) - (1 << 47), (1 << 64) - 1),
        ),
        min_size=1,
        max_size=8,
    ),
    size=st.integers(0, 3 * PAGE),
)
def test_hostile_tables_translate_and_read(
    palette: list[int],
    modes: list[int],
    seed: int,
    chain: int,
    cr3: int,
    la57: bool,
    vas: list[int],
    size: int,
) -> None:
    ram = hostile_ram(palette, modes, seed, chain)
    ram.budget = 5_000
    w = PageWalker(ram.read, cr3, la57=la57)
    t0 = time.perf_counter()
    for va in vas:
        try:
            m = w.lookup(va)
        except TranslationError:
            continue
        assert m.va <= va < m.va + m.size
        assert m.size in (KB4, MB2, GB1)
        assert m.pa % m.size == 0 and m.va % m.size == 0
        assert w.translate(va) == m.pa + (va - m.va)
        try:
            data = w.read(va, size)
        except TranslationError:
            continue
        assert len(data) == size
    assert time.perf_counter() - t0 < 2


# No shrinking: with a fan-out bug every failing try costs a full read budget, and
# test_mappings_fan_out_without_leaves_is_bounded is the minimal example anyway.
@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
)
@given(
    **hostile,
    start=st.integers(0, (1 << 64) - 1),
    length=st.integers(1, 1 << 64),
    limit=st.integers(1, 40),
)
def test_hostile_tables_mappings(
    palette: list[int],
    modes: list[int],
    seed: int,
    chain: int,
    cr3: int,
    la57: bool,
    start: int,
    length: int,
    limit: int,
) -> None:
    # Found the fan-out hang of test_mappings_fan_out_without_leaves_is_bounded (a
    # leafless dense tree) before 759492a.
    ram = hostile_ram(palette, modes, seed, chain)
    ram.budget = 10_000
    w = PageWalker(ram.read, cr3, la57=la57)
    end = min(start + length, 1 << 64)
    got: list[Mapping] = []
    t0 = time.perf_counter()
    try:
        for m in w.mappings(start, end, limit=limit):
            got.append(m)
    except TranslationError as e:  # the leaf limit (or a bound on tables read)
        assert len(got) == limit or "mappings" not in str(e)
    except ReadBudgetExceeded:
        pytest.fail(f"mappings(limit={limit}) read more than {ram.budget} page tables")
    assert time.perf_counter() - t0 < 5
    assert len(got) <= limit
    for m in got:
        assert m.va + m.size > start and m.va < end
        assert m.size in (KB4, MB2, GB1)
        assert w.canonical(m.va)
        assert w.lookup(m.va) == m  # same leaf, same combined permissions
    assert [m.va for m in got] == sorted(m.va for m in got)
