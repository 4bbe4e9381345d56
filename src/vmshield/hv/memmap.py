"""Guest physical RAM layout, parsed from QEMU's flattened memory tree.

Why parse ``info mtree -f``: it is the one place QEMU states, for any machine type and
RAM size, which guest-physical ranges are backed by which RAM block and at which offset
inside it (q35 splits RAM below and above 4 GiB; ROM shadows sit inside low RAM). Pure
function: text in, ranges out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from vmshield.errors import HypervisorError

_LINE = re.compile(
    r"^\s*(?P<start>[0-9a-f]+)-(?P<end>[0-9a-f]+)\s+\(prio\s+-?\d+,\s*(?P<kind>[a-z ]+)\):\s+"
    r"(?P<name>[^\s@]+)(?:\s+@(?P<off>[0-9a-f]+))?",
)
_MAX_LINES = 100_000


@dataclass(frozen=True)
class RamRange:
    """Guest-physical ``[start, end)`` backed by ``block`` from byte ``offset`` on."""

    start: int
    end: int
    block: str
    offset: int

    @property
    def size(self) -> int:
        return self.end - self.start


def parse_flatview(text: str) -> list[RamRange]:
    """RAM (and ROM-over-RAM) ranges of the first address space (``memory``) of the tree.

    Adjacent ranges of one block at contiguous offsets are merged, so a 512 MiB guest
    yields one range instead of six around the legacy BIOS holes.
    """
    ranges: list[RamRange] = []
    in_memory = False
    for n, line in enumerate(text.splitlines()):
        if n >= _MAX_LINES:
            raise HypervisorError("info mtree output is too long to be a memory tree")
        if line.startswith("FlatView #"):
            if ranges:
                break
            in_memory = False
            continue
        if line.lstrip().startswith('AS "'):
            in_memory = in_memory or line.lstrip().startswith('AS "memory"')
            continue
        if not in_memory:
            continue
        m = _LINE.match(line)
        if not m or m["kind"].strip() not in ("ram", "rom"):
            continue
        name = m["name"]
        if not _is_main_ram(name):
            continue
        start, end = int(m["start"], 16), int(m["end"], 16) + 1
        if end <= start:
            continue
        off = int(m["off"], 16) if m["off"] else 0
        if (
            ranges
            and ranges[-1].block == name
            and ranges[-1].end == start
            and (ranges[-1].offset + ranges[-1].size == off)
        ):
            prev = ranges.pop()
            ranges.append(RamRange(prev.start, end, name, prev.offset))
        else:
            ranges.append(RamRange(start, end, name, off))
    if not ranges:
        raise HypervisorError("no guest RAM found in QEMU's memory tree")
    return ranges


def _is_main_ram(name: str) -> bool:
    """Skip device memory (VGA VRAM, option ROMs, flash): only system RAM blocks count."""
    return not any(
        name.startswith(p) for p in ("vga", "pc.bios", "pc.rom", "system.flash", "isa-bios")
    )
