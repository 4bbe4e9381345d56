"""Guest physical memory: read and write by guest-physical address.

Two ways in, one interface:
- a shared RAM backend file (``memory-backend-file,share=on``) mapped into the monitor:
  no round trip to QEMU at all, the fast path every hot loop uses;
- QEMU's own address space through ``/proc/PID/mem``, at the host addresses QMP's
  ``gpa2hva`` gives, for a QEMU started without shared memory.

Writes here are for data only: TCG (and any code cache) only sees code changes made
through QEMU, so code is written through the gdbstub (see ``vmshield.hv.gdbstub``).
"""

from __future__ import annotations

import bisect
import mmap
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from vmshield.errors import HypervisorError, MemoryAccessError
from vmshield.hv.memmap import RamRange


class PhysicalMemory(Protocol):
    """What the guest layer needs from the hypervisor: bytes at guest-physical addresses."""

    def read(self, gpa: int, size: int) -> bytes: ...

    def write(self, gpa: int, data: bytes) -> None: ...


@dataclass
class _Window:
    """One guest-physical range and where its bytes live on the host."""

    start: int
    end: int
    view: mmap.mmap | None  # shared backend mapping, or None for /proc/PID/mem
    base: int  # offset in the mapping, or host virtual address in QEMU


class GuestMemory:
    """Guest RAM as a set of windows, each into a shared mapping or QEMU's memory.

    Reads that cross windows or fall into holes raise :class:`MemoryAccessError`: the
    guest chose the address (through its page tables), so a bad one is its problem,
    reported, not a crash.
    """

    MAX_READ = 256 << 20

    def __init__(self, windows: list[_Window], files: list[object]) -> None:
        self._windows = sorted(windows, key=lambda w: w.start)
        self._starts = [w.start for w in self._windows]
        self._keep = files  # mmaps and fds to close
        self._procmem: int | None = None
        self.size = sum(w.end - w.start for w in self._windows)

    @classmethod
    def from_shared(cls, ranges: list[RamRange], backends: dict[str, Path]) -> GuestMemory:
        """Map the shared backend files of ``ranges``; every range must be covered."""
        maps: dict[str, mmap.mmap] = {}
        windows = []
        for r in ranges:
            path = backends.get(r.block)
            if path is None:
                raise HypervisorError(
                    f"RAM block {r.block!r} is not a shared memory backend "
                    "(start QEMU with -object memory-backend-file,...,share=on)"
                )
            if r.block not in maps:
                try:
                    fd = os.open(path, os.O_RDWR)
                except OSError as e:
                    raise HypervisorError(f"cannot open guest RAM file {path}: {e}") from e
                try:
                    maps[r.block] = mmap.mmap(fd, 0, mmap.MAP_SHARED)
                finally:
                    os.close(fd)
            m = maps[r.block]
            if r.offset + r.size > len(m):
                raise HypervisorError(f"RAM block {r.block!r} is smaller than QEMU's map says")
            windows.append(_Window(r.start, r.end, m, r.offset))
        return cls(windows, list(maps.values()))

    @classmethod
    def from_process(cls, pid: int, ranges: list[RamRange], hvas: list[int]) -> GuestMemory:
        """QEMU's own memory through ``/proc/PID/mem`` (needs ptrace rights: same user)."""
        try:
            fd = os.open(f"/proc/{pid}/mem", os.O_RDWR)
        except OSError as e:
            raise HypervisorError(
                f"cannot open /proc/{pid}/mem of QEMU: {e} (run as the same user or root)"
            ) from e
        windows = [_Window(r.start, r.end, None, h) for r, h in zip(ranges, hvas, strict=True)]
        self = cls(windows, [])
        self._procmem = fd
        return self

    def close(self) -> None:
        for m in self._keep:
            if isinstance(m, mmap.mmap):
                m.close()
        self._keep = []
        if self._procmem is not None:
            os.close(self._procmem)
            self._procmem = None

    def _window(self, gpa: int, size: int) -> _Window:
        i = bisect.bisect_right(self._starts, gpa) - 1
        if i < 0 or size < 0 or gpa + size > self._windows[i].end:
            raise MemoryAccessError(f"guest-physical {gpa:#x}+{size:#x} is not RAM")
        return self._windows[i]

    def read(self, gpa: int, size: int) -> bytes:
        if size > self.MAX_READ:
            raise MemoryAccessError(f"read of {size} bytes at {gpa:#x} is too large")
        w = self._window(gpa, size)
        off = w.base + gpa - w.start
        if w.view is not None:
            return w.view[off : off + size]
        assert self._procmem is not None
        try:
            data = os.pread(self._procmem, size, off)
        except OSError as e:  # QEMU unmapped it, or exited: an error, not a traceback
            raise MemoryAccessError(
                f"cannot read QEMU's memory for guest-physical {gpa:#x}+{size:#x}: {e}"
            ) from None
        if len(data) != size:
            raise MemoryAccessError(f"short read of QEMU's memory at guest-physical {gpa:#x}")
        return data

    def view(self, gpa: int, size: int) -> memoryview:
        """A zero-copy view (shared backends only), for scanning large ranges."""
        w = self._window(gpa, size)
        if w.view is None:
            return memoryview(self.read(gpa, size))
        off = w.base + gpa - w.start
        return memoryview(w.view)[off : off + size]

    def write(self, gpa: int, data: bytes) -> None:
        w = self._window(gpa, len(data))
        off = w.base + gpa - w.start
        if w.view is not None:
            w.view[off : off + len(data)] = data
            return
        assert self._procmem is not None
        try:
            os.pwrite(self._procmem, data, off)
        except OSError as e:
            raise MemoryAccessError(
                f"cannot write QEMU's memory for guest-physical {gpa:#x}: {e}"
            ) from None

    def ranges(self) -> list[tuple[int, int]]:
        return [(w.start, w.end) for w in self._windows]
