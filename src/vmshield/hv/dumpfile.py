"""Guest memory dumps written by QEMU (``dump-guest-memory``, ELF): read them back.

A dump is a forensic snapshot: vmshield reads it the way it reads a live guest, through
the same ``read(gpa, size)`` interface, so the whole kernel model (symbols, tasks,
modules) works on it. QEMU adds a ``QEMU`` note per vCPU with its control registers,
which gives the CR3/CR4 to start from. The file is untrusted input: headers are
bounds-checked and a malformed one is a GuestFormatError.
"""

from __future__ import annotations

import bisect
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

from vmshield.errors import GuestFormatError, MemoryAccessError

PT_LOAD, PT_NOTE = 1, 4
MAX_SEGMENTS = 4096


@dataclass(frozen=True)
class DumpCpu:
    index: int
    rip: int
    cr0: int
    cr3: int
    cr4: int
    gs_base: int


class GuestDump:
    """Physical memory and vCPU control registers from a QEMU ELF dump."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            with open(path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as e:
            raise GuestFormatError(f"cannot map dump {path}: {e}") from e
        self._segs: list[tuple[int, int, int]] = []  # paddr, size, file offset
        self.cpus: list[DumpCpu] = []
        self._parse()

    def close(self) -> None:
        self._map.close()

    def _parse(self) -> None:
        m = self._map
        if len(m) < 64 or m[:4] != b"\x7fELF" or m[4] != 2 or m[5] != 1:
            raise GuestFormatError(f"{self.path} is not a little-endian ELF64 dump")
        (phoff,) = struct.unpack_from("<Q", m, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", m, 0x36)
        if phentsize != 56 or phnum > MAX_SEGMENTS or phoff + phnum * 56 > len(m):
            raise GuestFormatError(f"{self.path}: bad program headers")
        for i in range(phnum):
            ptype, _fl, off, _va, pa, filesz, _memsz, _al = struct.unpack_from(
                "<IIQQQQQQ", m, phoff + i * 56
            )
            if off + filesz > len(m):
                raise GuestFormatError(f"{self.path}: segment {i} runs past the file")
            if ptype == PT_LOAD and filesz:
                self._segs.append((pa, filesz, off))
            elif ptype == PT_NOTE:
                self._notes(off, filesz)
        self._segs.sort()
        self._starts = [s[0] for s in self._segs]

    def _notes(self, off: int, size: int) -> None:
        m = self._map
        end = off + size
        pos = off
        while pos + 12 <= end:
            namesz, descsz, _ntype = struct.unpack_from("<III", m, pos)
            name_at = pos + 12
            desc_at = name_at + ((namesz + 3) & ~3)
            nxt = desc_at + ((descsz + 3) & ~3)
            if nxt > end or nxt <= pos:
                raise GuestFormatError(f"{self.path}: malformed note at {pos:#x}")
            name = bytes(m[name_at : name_at + namesz]).rstrip(b"\0")
            if name == b"QEMU" and descsz >= 8 + 18 * 8 + 10 * 24 + 5 * 8:
                self.cpus.append(self._qemu_cpu(desc_at, len(self.cpus)))
            pos = nxt

    def _qemu_cpu(self, at: int, index: int) -> DumpCpu:
        """QEMUCPUState: version, size, 16 GPRs, rip, rflags, 10 segments (24 bytes:
        selector, limit, flags, pad, base), cr[5], kernel_gs_base."""
        m = self._map
        regs = struct.unpack_from("<18Q", m, at + 8)
        seg_at = at + 8 + 18 * 8
        gs_base = struct.unpack_from("<Q", m, seg_at + 4 * 24 + 16)[0]  # cs ds es fs gs
        cr = struct.unpack_from("<5Q", m, seg_at + 10 * 24)
        return DumpCpu(index, regs[16], cr[0], cr[3], cr[4], gs_base)

    def read(self, gpa: int, size: int) -> bytes:
        i = bisect.bisect_right(self._starts, gpa) - 1
        if i < 0:
            raise MemoryAccessError(f"guest-physical {gpa:#x} is not in the dump")
        pa, n, off = self._segs[i]
        if gpa + size > pa + n or size < 0:
            raise MemoryAccessError(f"guest-physical {gpa:#x}+{size:#x} is not in the dump")
        start = off + gpa - pa
        return bytes(self._map[start : start + size])
