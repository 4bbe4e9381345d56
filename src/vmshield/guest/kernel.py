"""The guest kernel from raw memory: where it is, its symbols, its types.

Attach flow (no guest cooperation, no debug symbols):
1. walk the kernel half of the page tables (CR3, PTI user bit cleared) over the kernel
   image range to find ``_text`` (the first mapped page there) and the KASLR slide;
2. find kallsyms in the image's read-only data by structure and decode it (or take it
   from the per-build cache), then check that kallsyms' ``_text`` is where the page
   tables put it and that ``linux_banner`` reads "Linux version";
3. read BTF between ``__start_BTF`` and ``__stop_BTF``, parsed lazily.
Everything the guest supplies is checked against something else it supplies.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from vmshield.errors import GuestFormatError, TranslationError, VmshieldError
from vmshield.guest import extsyms, kallsyms
from vmshield.guest.btf import Btf
from vmshield.guest.paging import PageWalker, ReadPhys
from vmshield.guest.symcache import CachedBuild, SymbolCache
from vmshield.guest.symtab import SymbolTable

KERNEL_MAP_START = 0xFFFF_FFFF_8000_0000
KERNEL_MAP_END = 0xFFFF_FFFF_C000_0000  # modules start here
LINK_TEXT = 0xFFFF_FFFF_8100_0000  # _text before KASLR (CONFIG_PHYSICAL_START 16M)


@dataclass(frozen=True)
class Extent:
    """A virtually and physically contiguous piece of the kernel image mapping."""

    va: int
    pa: int
    size: int
    writable: bool
    nx: bool

    def contains(self, va: int, size: int = 1) -> bool:
        return self.va <= va and va + size <= self.va + self.size


def image_extents(walker: PageWalker) -> list[Extent]:
    """The kernel image mapping, merged into contiguous extents (bounded walk)."""
    out: list[Extent] = []
    for m in walker.mappings(KERNEL_MAP_START, KERNEL_MAP_END, limit=1 << 18):
        if out:
            e = out[-1]
            if (
                e.va + e.size == m.va
                and e.pa + e.size == m.pa
                and e.writable == m.writable
                and e.nx == m.nx
            ):
                out[-1] = Extent(e.va, e.pa, e.size + m.size, e.writable, e.nx)
                continue
        out.append(Extent(m.va, m.pa, m.size, m.writable, m.nx))
    if not out:
        raise GuestFormatError("no kernel image mapped at 0xffffffff80000000 (wrong CR3?)")
    return out


def kernel_walker(read_phys: ReadPhys, cr3: int, cr4: int) -> PageWalker:
    """A walker for the kernel half: with PTI the user CR3 has bit 12 set; clear it."""
    la57 = bool(cr4 & (1 << 12))
    for root in (cr3, cr3 & ~(1 << 12)):
        w = PageWalker(read_phys, root, la57)
        try:
            next(w.mappings(KERNEL_MAP_START, KERNEL_MAP_END, limit=4))
        except (StopIteration, TranslationError):
            continue
        return w
    raise GuestFormatError(f"CR3 {cr3:#x} maps no kernel image (not a Linux guest?)")


@dataclass
class AttachStats:
    """How long each step of the attach took (for ``vmshield kernel`` and bench)."""

    cached: bool = False
    seconds: dict[str, float] = field(default_factory=dict)

    def lap(self, name: str, t0: float) -> float:
        now = time.perf_counter()
        self.seconds[name] = round(now - t0, 4)
        return now


class Kernel:
    """One guest kernel as vmshield sees it: memory, symbols, types."""

    def __init__(
        self,
        read_phys: ReadPhys,
        walker: PageWalker,
        extents: list[Extent],
        build: CachedBuild,
        addresses: list[int],
        stats: AttachStats,
    ) -> None:
        self._read_phys = read_phys
        self.walker = walker
        self.extents = extents
        self.build = build
        self.stats = stats
        self.text = extents[0].va
        self.slide = self.text - LINK_TEXT
        self.symbols = SymbolTable(build.names, addresses, build.types)
        self.symbol_source = "kallsyms"  # or the --symbols file (attach_external)
        self.btf_file: Path | None = None  # BTF copied by the guest agent, if any
        self.kallsyms_layout = ""  # the variant found (kallsyms.KallsymsTables.layout)
        self._check_anchors()

    def own_table_walker(self, via: Sequence[PageWalker] = ()) -> PageWalker | None:
        """A walker rooted at the kernel's own top-level table (``init_top_pgt``, or
        ``swapper_pg_dir``), or None when no such table maps both the kernel text and the
        direct map. Why: ``self.walker`` starts at whatever CR3 a vCPU had at attach; once
        that task exits, its freed top-level page is reused for anything (then every
        kernel address "is not mapped", seen on 5.10 and 7.3, or worse, the guest decides
        what we read). The table's own address is looked up through ``via`` (walkers on
        CR3s live now) as well as through ``self.walker``, whose root may already be the
        freed one; the direct map's base is read through the candidate root."""
        try:
            text = self.symbols.address("_stext")
        except VmshieldError:
            return None
        la57 = self.walker.va_bits == 57
        for name in ("init_top_pgt", "swapper_pg_dir"):
            if name not in self.symbols:
                continue
            for boot in (self.walker, *via):
                try:
                    root = boot.translate(self.symbols.address(name))
                    w = PageWalker(self.walker.read_phys, root, la57)
                    w.lookup(text)
                    if "page_offset_base" in self.symbols:
                        pa = w.translate(self.symbols.address("page_offset_base"))
                        w.lookup(int.from_bytes(self.walker.read_phys(pa, 8), "little"))
                except VmshieldError:
                    continue
                return w
        return None

    def root_at_own_table(self, via: Sequence[PageWalker] = ()) -> bool:
        """Move ``self.walker`` to the kernel's own top-level table (see
        :meth:`own_table_walker`); False (root unchanged) when none qualifies."""
        w = self.own_table_walker(via)
        if w is None:
            return False
        self.walker.root = w.root
        self.walker.flush()
        return True

    # -- attach -----------------------------------------------------------------------

    @classmethod
    def attach(
        cls, read_phys: ReadPhys, cr3: int, cr4: int, cache: SymbolCache | None = None
    ) -> Kernel:
        stats = AttachStats()
        t = time.perf_counter()
        walker = kernel_walker(read_phys, cr3, cr4)
        extents = image_extents(walker)
        t = stats.lap("page_walk", t)
        blob, base, loc = _find_kallsyms(read_phys, extents)
        key = hashlib.sha256(blob[loc.token_table : loc.token_index + 512]).hexdigest()
        t = stats.lap("locate", t)
        build = cache.load(key, blob) if cache else None
        if build is not None:
            stats.cached = True
            t = stats.lap("cache_load", t)
        else:
            tables = kallsyms.find_tables(blob, base)
            build = CachedBuild.from_decoded(key, blob, tables, kallsyms.decode(blob, tables))
            t = stats.lap("kallsyms_decode", t)
            if cache and tables.encoding != "absolute":  # u64 entries, relocated each boot
                cache.store(build)
        k = cls(read_phys, walker, extents, build, build.addresses(blob, base), stats)
        if not stats.cached:
            k.kallsyms_layout = tables.layout
        k.root_at_own_table()
        stats.lap("model", t)
        return k

    @classmethod
    def attach_external(cls, read_phys: ReadPhys, cr3: int, cr4: int, path: Path) -> Kernel:
        """Attach with the symbols of ``path`` (``--symbols``: System.map, /proc/kallsyms
        text or a Volatility 3 ISF) instead of kallsyms from memory: rebased by the slide
        the page tables give, then checked against guest memory (see extsyms)."""
        stats = AttachStats()
        t = time.perf_counter()
        walker = kernel_walker(read_phys, cr3, cr4)
        extents = image_extents(walker)
        t = stats.lap("page_walk", t)
        f = extsyms.load_symbol_file(path)
        syms = extsyms.rebased(f, extsyms.slide_of(f, extents[0].va))
        build = CachedBuild(
            key=f"external-{f.sha256}",
            span=(0, 0),
            span_sha256="",
            rb_at=-1,
            names=[s.name for s in syms],
            types="".join(s.type for s in syms),
            offsets=[],
        )
        try:
            k = cls(read_phys, walker, extents, build, [s.address for s in syms], stats)
        except GuestFormatError as e:
            raise GuestFormatError(f"--symbols {path} does not match this guest: {e}") from None
        k.symbol_source = f"{path} ({f.kind})"
        k._check_external(path)
        k.root_at_own_table()
        if (path.parent / "btf").is_file() and path.name == "kallsyms":
            k.btf_file = path.parent / "btf"  # a guest agent transfer (guest.transfer)
        stats.lap("symbols_file", t)
        return k

    def _check_external(self, path: Path) -> None:
        """Function prologues at the file's addresses, and text inside the image."""
        checked = 0
        for name in extsyms.PROLOGUE_CHECKS:
            sym = self.symbols.get(name)
            if sym is None:
                continue
            try:
                problem = extsyms.entry_problem(self.read(sym.address, 16))
            except TranslationError:
                problem = "not mapped"
            if problem:
                raise GuestFormatError(
                    f"--symbols {path} does not match this guest: {name} at "
                    f"{sym.address:#x} is not a function entry ({problem})"
                )
            checked += 1
        if checked < extsyms.MIN_PROLOGUES:
            raise GuestFormatError(
                f"--symbols {path}: fewer than {extsyms.MIN_PROLOGUES} of the functions "
                f"checked against guest memory ({', '.join(extsyms.PROLOGUE_CHECKS)})"
            )
        lo, hi = self.text, max(e.va + e.size for e in self.extents)
        for name, addr, typ in zip(
            self.symbols.names, self.symbols.addrs, self.symbols.types, strict=True
        ):
            if typ in "Tt" and not lo <= addr < hi:
                raise GuestFormatError(
                    f"--symbols {path} does not match this guest: text symbol {name} at "
                    f"{addr:#x} is outside the kernel image ({lo:#x}..{hi:#x})"
                )

    def _check_anchors(self) -> None:
        text = self.symbols.get("_text")
        if text is None or text.address != self.text:
            raise GuestFormatError(
                "kallsyms _text does not match the page tables "
                f"({text.address if text else 0:#x} vs {self.text:#x}): forged symbol table?"
            )
        if not self.banner.startswith("Linux version "):
            raise GuestFormatError("linux_banner does not read 'Linux version'")

    # -- memory -----------------------------------------------------------------------

    def read(self, va: int, size: int) -> bytes:
        """Kernel virtual memory (image fast path, else a page walk)."""
        for e in self.extents:
            if e.contains(va, size):
                return self._read_phys(e.pa + va - e.va, size)
        return self.walker.read(va, size)

    def u64(self, va: int) -> int:
        return int.from_bytes(self.read(va, 8), "little")

    def u32(self, va: int) -> int:
        return int.from_bytes(self.read(va, 4), "little")

    def s32(self, va: int) -> int:
        return int.from_bytes(self.read(va, 4), "little", signed=True)

    def cstring(self, va: int, limit: int = 256) -> str:
        """A NUL-terminated string, bounded; undecodable bytes are escaped."""
        raw = self.read(va, limit)
        end = raw.find(b"\0")
        return (raw if end < 0 else raw[:end]).decode("utf-8", errors="backslashreplace")

    # -- identity ---------------------------------------------------------------------

    @cached_property
    def banner(self) -> str:
        return self.cstring(self.symbols.address("linux_banner"), 512).strip()

    @property
    def release(self) -> str:
        m = re.match(r"Linux version (\S+)", self.banner)
        return m[1] if m else "?"

    @cached_property
    def _btf_blob(self) -> bytes:
        """This guest's BTF bytes, read once: the hash and the parse see the same bytes,
        so a guest rewriting its BTF meanwhile cannot pair one hash with other layouts.
        Symbols without ``__start_BTF`` (a guest agent transfer) use the copied file."""
        if "__start_BTF" not in self.symbols and self.btf_file is not None:
            return self.btf_file.read_bytes()  # from the guest agent
        start = self.symbols.address("__start_BTF")
        stop = self.symbols.address("__stop_BTF")
        if not 0 < stop - start <= 64 << 20:
            raise GuestFormatError(f"BTF bounds are implausible ({start:#x}..{stop:#x})")
        return self.read(start, stop - start)

    @cached_property
    def btf_sha256(self) -> str:
        """SHA-256 of this guest's BTF blob: the key of every layout cached from it."""
        t0 = time.perf_counter()
        digest = hashlib.sha256(self._btf_blob).hexdigest()
        self.stats.seconds["btf_hash"] = round(time.perf_counter() - t0, 4)
        return digest

    @cached_property
    def btf(self) -> Btf:
        """The kernel's BTF, read from its own memory on first use."""
        return Btf.parse(self._btf_blob)

    def member_offset(self, struct: str, path: str) -> int:
        """Byte offset of a member (dotted path through embedded members), from BTF.

        Cached per build under the hash of this guest's own BTF: another guest of the
        same build with different BTF never supplies the offsets used here."""
        return self._layout(f"{struct}.{path}", lambda: self.btf.member_offset(struct, path))

    def sizeof(self, type_name: str) -> int:
        return self._layout(f"sizeof:{type_name}", lambda: self.btf.sizeof(type_name))

    def _layout(self, key: str, resolve: Callable[[], int]) -> int:
        known = self.build.layout(self.btf_sha256, key)
        if known is None:
            known = resolve()
            self.build.remember(self.btf_sha256, key, known)
        return known


def _find_kallsyms(
    read_phys: ReadPhys, extents: list[Extent]
) -> tuple[bytes, int, kallsyms.TokenLocation]:
    """(read-only data blob, its base VA, where the token table sits in it)."""
    # Read-only, non-executable extents first: that is .rodata.
    order = sorted(extents, key=lambda e: (e.writable, not e.nx))
    for e in order:
        if e.writable or e.size > 256 << 20:
            continue
        blob = read_phys(e.pa, e.size)
        loc = kallsyms.locate_token_table(blob, e.va)
        if loc is not None:
            return blob, e.va, loc
    raise GuestFormatError("kallsyms token table not found in the kernel's read-only data")


__all__ = ["Extent", "Kernel", "image_extents", "kernel_walker"]
