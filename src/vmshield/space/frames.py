"""Protected pages: how each was mapped when vmshield took it over, re-walked by the
checks; and reference copies of the kernel tables a rootkit rewrites.
"""

from __future__ import annotations

import contextlib

from vmshield.errors import VmshieldError
from vmshield.guest.paging import PageWalker
from vmshield.space.alert import Alert
from vmshield.space.base import PAGE, Frame
from vmshield.space.errors import SpaceError
from vmshield.space.state import PersistedSpace

# Bits the CPU itself sets in page-table entries (accessed, dirty): not a change.
PTE_HW_BITS = (1 << 5) | (1 << 6)


# Kernel tables whose change is a classic rootkit move, and their size bounds.
PROTECTED_TABLES = (("sys_call_table", 8 * 1024), ("ia32_sys_call_table", 8 * 1024),
                    ("x32_sys_call_table", 8 * 1024), ("idt_table", 16 * 256))  # fmt: skip


class ProtectedPages(PersistedSpace):
    """Recording protected pages, re-walking them, reading and writing at their frames."""

    @property
    def walker(self) -> PageWalker:
        """A walker rooted at the kernel's own top-level table (``init_top_pgt``), not at
        the CR3 some task had at attach: that task may exit and its freed page table page
        be refilled by the guest with whatever it wants us to see."""
        if self._walker is None:
            self._walker = self.k.own_table_walker() or self.k.walker
        return self._walker

    def _record(self, va: int, where: str) -> None:
        """Remember how the page of ``va`` is mapped now (build time: trusted)."""
        page = va & ~(PAGE - 1)
        if page in self.frames:
            return
        m, chain = self.walker.chain(page)
        self.frames[page] = Frame(where, page, m.pa + (page - m.va), m.writable, m.nx, chain)

    def _record_region(self) -> None:
        r = self.region
        assert r is not None
        for i, pa in enumerate(r.pages):
            va = r.base + i * PAGE
            what = ("text" if i < r.text_pages else
                    "config" if i < r.text_pages + r.config_pages else "ring")  # fmt: skip
            m, chain = self.walker.chain(va)
            want = {"text": (False, False), "config": (False, True), "ring": (True, True)}[what]
            if m.pa + (va - m.va) != pa or (m.writable, m.nx) != want:
                raise SpaceError(
                    f"security space {what} page {va:#x} is not mapped as built "
                    f"(pa {m.pa + (va - m.va):#x}, rw={m.writable}, nx={m.nx})"
                )
            self.frames[va] = Frame(f"security space {what}", va, pa, m.writable, m.nx, chain)

    def _frame_read(self, va: int, n: int) -> bytes:
        """Bytes of protected pages at the frames recorded for them (the deep check makes
        sure the page tables still point there); other pages through a fresh walk."""
        out = bytearray()
        while n > 0:
            page = va & ~(PAGE - 1)
            m = min(n, PAGE - (va - page))
            f = self.frames.get(page)
            if f is not None:
                out += self.t.mem.read(f.pa + (va - page), m)
            else:
                out += self.walker.read(va, m)
            va, n = va + m, n - m
        return bytes(out)

    def _check_frames(self) -> list[Alert]:
        """Re-walk every protected page through the current page tables: a page mapped
        elsewhere, with other permissions, or not at all, is a ``pte`` alert carrying the
        entries that put it back."""
        alerts = []
        w = self.walker
        w.flush()
        for f in self.frames.values():
            want = f"pa={f.pa:#x} rw={f.writable} nx={f.nx}"
            try:
                m = w.lookup(f.va)
                pa = m.pa + (f.va - m.va)
                if (pa, m.writable, m.nx) == (f.pa, f.writable, f.nx):
                    continue
                found = f"pa={pa:#x} rw={m.writable} nx={m.nx}"
            except VmshieldError as e:
                found = f"unreadable: {e}"
            alerts.append(Alert("pte", f.where, f.va, want, found, self._chain_fix(f)))
        return alerts

    def _chain_fix(self, f: Frame) -> tuple[tuple[int, bytes], ...]:
        """The recorded entries that differ now (accessed/dirty bits aside), with their
        recorded values (keeping the current accessed/dirty bits)."""
        fix = []
        for at, value in f.chain:
            try:
                now = int.from_bytes(self.t.mem.read(at, 8), "little")
            except VmshieldError:
                continue
            if (now ^ value) & ~PTE_HW_BITS:
                put = (value & ~PTE_HW_BITS) | (now & PTE_HW_BITS)
                fix.append((at, put.to_bytes(8, "little")))
        return tuple(fix)

    def _write_frames(self, va: int, data: bytes) -> None:
        """Data writes to protected pages go to their recorded frames."""
        pos = 0
        while pos < len(data):
            a = va + pos
            page = a & ~(PAGE - 1)
            n = min(len(data) - pos, PAGE - (a - page))
            f = self.frames.get(page)
            if f is not None:
                self.t.mem.write(f.pa + (a - page), data[pos : pos + n])
            else:
                self._write_data(a, data[pos : pos + n])
            pos += n

    def snapshot_tables(self) -> None:
        """Reference copies of kernel tables a rootkit rewrites (syscall tables, IDT),
        with a sanity check of the syscall table: every entry must point into kernel
        text, or the copy is already corrupt and that is reported at the first check."""
        k = self.k
        self.tables, self.table_findings = {}, []
        lo, hi = k.symbols.address("_stext"), k.symbols.address("_etext")
        for name, limit in PROTECTED_TABLES:
            if name not in k.symbols:
                continue
            va, size = k.symbols.extent(name, limit)
            if size < 8:
                continue
            try:
                data = k.read(va, size)
            except VmshieldError:
                continue
            self.tables[name] = (va, data)
            for page in range(va & ~(PAGE - 1), va + size, PAGE):
                with contextlib.suppress(VmshieldError):
                    self._record(page, name)
            if name.endswith("sys_call_table"):
                ptrs = [int.from_bytes(data[j : j + 8], "little") for j in range(0, size - 7, 8)]
                while ptrs and ptrs[-1] == 0:  # alignment padding up to the next symbol
                    ptrs.pop()
                for i, ptr in enumerate(ptrs):
                    if not lo <= ptr < hi:
                        self.table_findings.append(Alert(
                            "kernel-table", f"{name}[{i}]", va + 8 * i,
                            "a kernel text address", f"{ptr:#x}"))  # fmt: skip
