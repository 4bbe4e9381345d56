"""The agent's capture language: fetches, plans, and the captured items of a record.

The exit engine reads guest memory at the moment of the stop; the agent has to capture
everything at the hit, because by the time the host drains the ring the objects may be
gone (a file closed, a task exited). An object is therefore described as a short list
of fetches (address chains from the argument registers or ``current``, BTF offsets) and
a decoder over the captured bytes: a :class:`Plan`. Each object's plan lives with the
object (:mod:`vmshield.objects`); this module holds what every plan is made of and how
a record's items are parsed. Strings are bounded (``PATH_MAX_CAPTURE``); a truncated or
faulted item becomes a decode error on the event, as in the exit engine.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from vmshield.errors import VmshieldError
from vmshield.space import layout as L
from vmshield.space.rules import v4mapped_dotted

PATH_MAX_CAPTURE = 400  # bytes per path in a record (two fit, for rename)
ARGV_MAX_CAPTURE = 560
PORT_SOCKADDR, PORT_HOST_U16 = 0, 1


@dataclass
class Item:
    kind: int
    status: int
    data: bytes

    def text(self) -> str:
        return self.data.split(b"\0", 1)[0].decode(errors="backslashreplace")

    def u(self, off: int, size: int, signed: bool = False) -> int:
        if off < 0 or off + size > len(self.data):
            raise VmshieldError(f"a captured item holds {len(self.data)} bytes, not {off + size}")
        return int.from_bytes(self.data[off : off + size], "little", signed=signed)


@dataclass
class Captured:
    """A record as the decoders see it."""

    args: list[int]
    items: list[Item]
    errors: list[str] = field(default_factory=list)

    def arg(self, n: int) -> int:
        return self.args[n]

    def sarg(self, n: int) -> int:
        v = self.args[n]
        return v - (1 << 64) if v >> 63 else v

    def item(self, n: int, what: str) -> Item:
        if n >= len(self.items):
            raise VmshieldError(f"{what}: not captured")
        it = self.items[n]
        if it.status == L.S_FAULT:
            raise VmshieldError(f"{what}: the agent could not read it (fault)")
        if it.status == L.S_TRUNC:
            self.errors.append(f"{what}: longer than the record allows, truncated")
        return it


Decode = Callable[[Captured], dict[str, Any]]


@dataclass(frozen=True)
class Plan:
    """How one object is captured and decoded."""

    fetches: tuple[L.Fetch, ...]
    decode: Decode
    path_item: int = -1
    port_item: int = -1
    port_mode: int = PORT_SOCKADDR
    nargs: int = 0  # argument registers the decoder reads (records keep only these)
    # What the guest aggregates hits by when asked to (``L.K_*``; K_NONE: the subject).
    agg_key: int = L.K_NONE
    # Items the decoder can do without (bit n: item n; exec goes on without argv and
    # reports its fault); a fault in any other item leaves the event without fields.
    optional_items: int = 0
    # Offsets of uid, euid, gid, egid, fsuid, cap_effective within items 0 (new) and 1
    # (old) when those items are ``struct cred`` spans (cred.change); empty: none.
    cred_offsets: tuple[int, ...] = ()
    # The event's fields are the argument registers as they are (``kfunc:`` points).
    raw_args: bool = False

    def max_size(self) -> int:
        """The largest record this plan can make (the room the agent reserves)."""
        items = sum((4 + int(f.len) + 7) & ~7 for f in self.fetches)
        return min(L.RECORD_MAX, L.RECORD_HEADER + 8 * self.nargs + items)


def fill_site(s: L.Site, plan: Plan) -> None:
    """Write a plan into the agent's site: its fetches and what the agent needs beyond
    them to build the texts filters compare (the items the decoder cannot do without,
    where a cred's fields are, how IPv6 addresses are printed). Generic on purpose:
    everything particular to an object is a field of its plan."""
    s.nfetch = len(plan.fetches)
    for j, f in enumerate(plan.fetches):
        s.fetch[j] = f
    s.path_item, s.port_item, s.port_mode = plan.path_item, plan.port_item, plan.port_mode
    s.nargs, s.max_size = plan.nargs, plan.max_size()
    s.need_items = ((1 << len(plan.fetches)) - 1) & ~plan.optional_items
    s.cred_item = 0 if plan.cred_offsets else -1
    for i, o in enumerate(plan.cred_offsets):
        s.cred_off[i] = o
    s.net_flags = v4mapped_dotted()


def fetch(kind: int, base: int, offs: tuple[int, ...] = (0,), length: int = 8,
          base2: int = L.B_NONE, off2: int = 0) -> L.Fetch:  # fmt: skip
    """A fetch: ``base`` then, for every offset but the last, add and dereference."""
    if not 1 <= len(offs) <= 4:
        raise ValueError("one to four offsets")
    f = L.Fetch()
    f.kind, f.base, f.nderef, f.base2, f.len = kind, base, len(offs) - 1, base2, length
    for i, o in enumerate(offs):
        f.off[i] = o
    f.off2 = off2
    return f


def parse_items(data: bytes, count: int) -> list[Item]:
    """The items of a record's data area; bounded by the area and ``count``."""
    items: list[Item] = []
    pos = 0
    for _ in range(min(count, L.MAX_FETCH)):
        if pos + 4 > len(data):
            break
        n, kind, status = struct.unpack_from("<HBB", data, pos)
        if pos + 4 + n > len(data):
            items.append(Item(kind, L.S_FAULT, b""))
            break
        items.append(Item(kind, status, data[pos + 4 : pos + 4 + n]))
        pos += (4 + n + 7) & ~7
    return items
