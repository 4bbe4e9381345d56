"""x86-64 page-table walks over guest-physical memory.

Paging modes are data: a mode is the list of its levels (shift of the index, whether a
leaf may sit there), and one loop walks any of them. 4-level and 5-level (LA57) differ
by one row. Entries come from the guest and are untrusted: every walk is bounded by
the number of levels, and a reserved or absent entry is a :class:`TranslationError`.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from vmshield.errors import MemoryAccessError, TranslationError

PAGE = 4096
_ADDR_MASK = 0x000F_FFFF_FFFF_F000
_PRESENT = 1
_RW = 1 << 1
_USER = 1 << 2
_PS = 1 << 7
_NX = 1 << 63

ReadPhys = Callable[[int, int], bytes]


@dataclass(frozen=True)
class Level:
    """One table level: the index is VA bits ``[shift, shift+9)``; leaf allowed if large."""

    shift: int
    large: bool


FOUR_LEVEL: tuple[Level, ...] = (
    Level(39, False),
    Level(30, True),
    Level(21, True),
    Level(12, True),
)
FIVE_LEVEL: tuple[Level, ...] = (Level(48, False), *FOUR_LEVEL)


@dataclass(frozen=True)
class Mapping:
    """A leaf translation: the page containing a VA."""

    va: int  # page-aligned start
    pa: int
    size: int
    writable: bool
    user: bool
    nx: bool


CR3_ADDR_MASK = 0x000F_FFFF_FFFF_F000
_TLB_MAX = 1 << 16


PTI_USER_BIT = 1 << 12


class PageWalker:
    """Translates virtual addresses of one address space (one CR3)."""

    def __init__(self, read_phys: ReadPhys, cr3: int, la57: bool = False) -> None:
        self._read = read_phys
        self.read_phys = read_phys  # for walkers of other address spaces
        self.root = cr3 & CR3_ADDR_MASK
        self.levels = FIVE_LEVEL if la57 else FOUR_LEVEL
        self.va_bits = 57 if la57 else 48
        self._tlb: dict[int, Mapping] = {}

    def canonical(self, va: int) -> bool:
        top = va >> (self.va_bits - 1)
        return top == 0 or top == (1 << (65 - self.va_bits)) - 1

    def _entry(self, table: int, index: int) -> int:
        try:
            raw = self._read(table + index * 8, 8)
        except MemoryAccessError as e:
            raise TranslationError(f"page table at {table:#x} is outside guest RAM") from e
        return int.from_bytes(raw, "little")

    def lookup(self, va: int) -> Mapping:
        """The leaf mapping of ``va``; TranslationError if unmapped or malformed."""
        if not 0 <= va < 1 << 64 or not self.canonical(va):
            raise TranslationError(f"{va:#x} is not a canonical address")
        tlb = self._tlb
        hit = tlb.get(va & ~0xFFF) or tlb.get(va & ~0x1FFFFF) or tlb.get(va & ~0x3FFFFFFF)
        if hit is not None and hit.va <= va < hit.va + hit.size:
            return hit
        m = self._walk(va)
        if len(tlb) > _TLB_MAX:
            tlb.clear()
        tlb[m.va] = m
        return m

    def _walk(self, va: int) -> Mapping:
        table = self.root
        writable = user = True
        nx = False
        for lvl in self.levels:
            index = (va >> lvl.shift) & 0x1FF
            e = self._entry(table, index)
            if not e & _PRESENT:
                raise TranslationError(f"{va:#x} is not mapped (level shift {lvl.shift})")
            writable = writable and bool(e & _RW)
            user = user and bool(e & _USER)
            nx = nx or bool(e & _NX)
            if lvl.shift != 12 and e & _PS and not lvl.large:
                raise TranslationError(f"{va:#x}: page-size bit set at level shift {lvl.shift}")
            if lvl.shift == 12 or e & _PS:
                size = 1 << lvl.shift
                base = e & _ADDR_MASK & ~(size - 1)
                start = va & ~(size - 1)
                return Mapping(start, base, size, writable, user, nx)
            table = e & _ADDR_MASK
        raise TranslationError(f"{va:#x}: page walk did not end")  # pragma: no cover

    def chain(self, va: int) -> tuple[Mapping, tuple[tuple[int, int], ...]]:
        """A fresh walk of ``va`` (no cached translation) and the entries it went through:
        ``(physical address of the entry, its value)`` from the root down to the leaf.
        Integrity checks keep this to tell a remapped page and to put its entries back."""
        table = self.root
        entries: list[tuple[int, int]] = []
        for lvl in self.levels:
            at = table + ((va >> lvl.shift) & 0x1FF) * 8
            e = self._entry(table, (va >> lvl.shift) & 0x1FF)
            entries.append((at, e))
            if not e & _PRESENT or lvl.shift == 12 or e & _PS:
                break
            table = e & _ADDR_MASK
        return self._walk(va), tuple(entries)

    def translate(self, va: int) -> int:
        m = self.lookup(va)
        return m.pa + (va - m.va)

    def flush(self) -> None:
        """Forget cached translations (after the guest may have changed its tables).

        Translations of every page size are cached: kernel reads mostly hit the direct
        map's 2M/1G pages, and a full 5-level walk per read would dominate event cost.
        Long-lived users flush periodically."""
        self._tlb.clear()

    def read(self, va: int, size: int) -> bytes:
        """Bytes at a virtual address, page by page (pages need not be contiguous)."""
        if size < 0 or size > 64 << 20:
            raise TranslationError(f"bad read size {size} at {va:#x}")
        out = bytearray()
        while size > 0:
            m = self.lookup(va)
            off = va - m.va
            n = min(size, m.size - off)
            try:
                out += self._read(m.pa + off, n)
            except MemoryAccessError as e:
                raise TranslationError(f"{va:#x} maps outside guest RAM ({e})") from e
            va += n
            size -= n
        return bytes(out)

    def read_u64(self, va: int) -> int:
        return int.from_bytes(self.read(va, 8), "little")

    def read_u32(self, va: int) -> int:
        return int.from_bytes(self.read(va, 4), "little")

    def mappings(self, start: int, end: int, limit: int = 1 << 20) -> Iterator[Mapping]:
        """Leaf mappings in ``[start, end)`` in address order, skipping absent subtrees.

        Bounded by ``limit`` leaves and by ``max(limit, 4096)`` page-table pages read, so
        a guest with a huge (or leafless, or looping) forged table tree cannot keep the
        monitor busy. Permissions combine every level, as :meth:`lookup`'s do.
        """
        budget = [limit, max(limit, 4096), limit]
        yield from self._iter(self.root, 0, 0, start, end, budget, (True, True, False))

    def _sign(self, va: int) -> int:
        """Sign-extend a VA of ``va_bits`` bits to its canonical 64-bit form."""
        if va >> (self.va_bits - 1) & 1:
            return va | (((1 << 64) - 1) ^ ((1 << self.va_bits) - 1))
        return va

    def _iter(
        self,
        table: int,
        depth: int,
        base: int,
        start: int,
        end: int,
        budget: list[int],
        perms: tuple[bool, bool, bool],
    ) -> Iterator[Mapping]:
        lvl = self.levels[depth]
        span = 1 << lvl.shift
        budget[1] -= 1
        if budget[1] < 0:
            raise TranslationError(f"too many page tables under {start:#x}-{end:#x}")
        try:
            raw = self._read(table, PAGE)
        except MemoryAccessError:
            return
        entries = struct.unpack("<512Q", raw)
        for index, e in enumerate(entries):
            va = base + index * span if depth else self._sign(index * span)
            if va + span <= start or va >= end or not e & _PRESENT:
                continue
            rw = perms[0] and bool(e & _RW)
            user = perms[1] and bool(e & _USER)
            nx = perms[2] or bool(e & _NX)
            if lvl.shift != 12 and e & _PS and not lvl.large:
                continue  # reserved: not a mapping
            if lvl.shift == 12 or e & _PS:
                budget[0] -= 1
                if budget[0] < 0:
                    raise TranslationError(f"more than {budget[2]} mappings in {start:#x}-{end:#x}")
                pa = e & _ADDR_MASK & ~(span - 1)
                yield Mapping(va, pa, span, rw, user, nx)
            else:
                yield from self._iter(
                    e & _ADDR_MASK, depth + 1, va, start, end, budget, (rw, user, nx)
                )
