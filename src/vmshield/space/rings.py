"""The host's reader of the agent's per-CPU rings, which the guest can scribble on.

A ring header lives in guest memory that the guest kernel can write, so nothing in it is
taken on trust. The host keeps its own copy of everything it needs, per CPU:

- its read position (the tail it publishes): records are read from there, never from
  the guest's ``tail``, and the position never goes back, so a head moved backwards
  cannot replay records, and a tail moved up to head cannot make the host skip them;
- the ring position of the next record: each record carries ``seq``, the low 32 bits of
  the position the agent wrote it at plus one (a zeroed slot is no record), so a slot
  shown at another position (replayed, overwritten after a forged tail, or forged) is
  refused;
- the last value of every counter: ``hits``, ``drops``, ``nested``, ``denied``,
  ``killed`` only grow, ``drops`` never grows faster than ``hits`` (each drop is a hit),
  and every hit ends as a published record or a drop, so hits that rise with nothing to
  show (the agent switched off by a forged in-flight flag, with hits forged to look
  alive) are seen as well.

Anything that goes the wrong way is an :class:`Alert` (``ring-state``); the host then
re-bases on what it found, so a reset or saturated drop counter still reports later
drops. A forged in-flight flag is caught by :meth:`RingReader.check_inflight`, once per
check interval: the agent runs with interrupts off, so a flag that stays set while the
CPU's hit count stands still was not set by the agent.
"""

from __future__ import annotations

import ctypes as C
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from vmshield.space import layout as L
from vmshield.space.alert import Alert

ReadVa = Callable[[int, int], bytes]
WriteVa = Callable[[int, bytes], None]
PaOf = Callable[[int], int]

U64 = 1 << 64
COUNTERS = ("hits", "drops", "nested", "denied", "killed")
_HSIZE = C.sizeof(L.RingHeader)
_RSIZE = C.sizeof(L.Record)
_OFF = {n: getattr(L.RingHeader, n).offset for n in ("head", "tail", "inflight", *COUNTERS)}


def _since(now: int, then: int) -> int:
    """How far a 64-bit counter moved, as the agent's wrapping arithmetic has it."""
    d = (now - then) % U64
    return d - U64 if d >= 1 << 63 else d


@dataclass
class RingState:
    """The host's own copy of one CPU's ring state."""

    pos: int = 0  # next position to read; the tail the host publishes
    last: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0))
    # Balance baseline: hits == published records + drops (+1 for a hit in flight).
    base_hits: int = 0
    base_head: int = 0
    base_drops: int = 0
    standing: set[str] = field(default_factory=set)  # findings reported, not yet gone
    back_head: int = 0  # the guest's head while it stands behind pos
    seen_inflight: tuple[int, int] | None = None  # (inflight, hits) at the last check


class RingReader:
    """Drains and checks the rings of one security space.

    ``read``/``write`` address guest memory by virtual address inside the space (the
    space maps them to the frames it recorded); ``pa`` gives the physical address of a
    virtual one, for the repairs carried by alerts.
    """

    def __init__(
        self, read: ReadVa, write: WriteVa, pa: PaOf, rings_va: int, stride: int, ncpus: int,
        nslots: int, slot_size: int = L.SLOT_SIZE,
    ) -> None:  # fmt: skip
        self.read, self.write, self.pa = read, write, pa
        self.rings_va, self.stride, self.ncpus = rings_va, stride, ncpus
        self.nslots, self.slot_size = nslots, slot_size
        self.state = [RingState() for _ in range(ncpus)]
        self.findings: list[Alert] = []
        self.dropped = 0  # drops seen since the last take_dropped()
        self.total_dropped = 0

    def ring(self, cpu: int) -> int:
        return self.rings_va + cpu * self.stride

    def header(self, cpu: int) -> L.RingHeader:
        return L.RingHeader.from_buffer_copy(self.read(self.ring(cpu), _HSIZE))

    def take_findings(self) -> list[Alert]:
        out, self.findings = self.findings, []
        return out

    def take_dropped(self) -> int:
        n, self.dropped = self.dropped, 0
        return n

    # -- findings -------------------------------------------------------------------------

    def _find(self, cpu: int, key: str, field_name: str, expected: str, found: str,
              fix: int | None = None, standing: bool = False) -> None:  # fmt: skip
        """Record a finding; a standing one (a state, not an event) is reported once
        until it is gone. ``fix`` is the 64-bit value that puts the field right."""
        st = self.state[cpu]
        if standing:
            if key in st.standing:
                return
            st.standing.add(key)
        va = self.ring(cpu) + _OFF[field_name]
        repair = ((self.pa(va), fix.to_bytes(8, "little")),) if fix is not None else ()
        self.findings.append(Alert("ring-state", f"cpu {cpu} ring {field_name}", va,
                                   expected, found, repair))  # fmt: skip

    def _rebase(self, st: RingState, h: L.RingHeader) -> None:
        st.base_hits, st.base_head, st.base_drops = int(h.hits), int(h.head), int(h.drops)
        for name in COUNTERS:
            st.last[name] = int(getattr(h, name))

    # -- drain ------------------------------------------------------------------------------

    def drain(self, limit: int = 4096) -> Iterator[tuple[L.Record, bytes]]:
        """Records published since the last drain, per CPU in ring order; each is yielded
        once whatever the guest does to the header. Findings and drops accumulate."""
        for cpu in range(self.ncpus):
            yield from self._drain_cpu(cpu, limit)

    def _drain_cpu(self, cpu: int, limit: int) -> Iterator[tuple[L.Record, bytes]]:
        st = self.state[cpu]
        ring = self.ring(cpu)
        h = self.header(cpu)
        head, tail = int(h.head), int(h.tail)
        n_found = len(self.findings)
        if tail != st.pos:
            self._find(cpu, "tail", "tail", f"{st.pos}", f"{tail} (not the host's tail)")
        if head < st.pos:
            # Moved backwards: the slots below our position were read already; reading them
            # again would replay them. The agent sees a full ring and counts drops until
            # head is put back.
            self._find(cpu, "head-back", "head", f">= {st.pos}", f"{head} (moved backwards)",
                       fix=st.pos, standing=True)  # fmt: skip
            st.back_head = head
            end = st.pos
        else:
            if "head-back" in st.standing:  # repaired: the jump forward is ours, not records
                st.standing.discard("head-back")
                st.base_head += st.pos - st.back_head
            end = min(head, st.pos + self.nslots, st.pos + limit)
        if head - st.pos > self.nslots:
            self._find(cpu, "head-ahead", "head", f"<= {st.pos + self.nslots}",
                       f"{head} (more than a ring ahead of the host)")  # fmt: skip
        pos = st.pos
        while pos < end:
            # One read per contiguous run of slots (up to the ring's wrap point).
            first = pos % self.nslots
            count = min(end - pos, self.nslots - first)
            blob = self.read(ring + L.slot_offset(pos, self.nslots, self.slot_size),
                             count * self.slot_size)  # fmt: skip
            for i in range(count):
                data = blob[i * self.slot_size : (i + 1) * self.slot_size]
                rec = L.Record.from_buffer_copy(data, 0)
                if rec.seq != (pos + i + 1) & 0xFFFFFFFF:
                    # Not the record of this position: replayed, overwritten (a forged tail
                    # let the agent lap us) or forged. Nothing from here to head is trusted.
                    self._find(cpu, "seq", "head", f"record #{pos + i} at slot {first + i}",
                               f"record #{rec.seq - 1} (replayed, overwritten or forged; "
                               f"{max(0, head - pos - i)} records skipped)")  # fmt: skip
                    pos = max(head, pos + i + 1)
                    end = pos
                    break
                yield rec, data[_RSIZE : _RSIZE + min(rec.used, L.RECORD_DATA)]
            else:
                pos += count
        st.pos = pos
        self.write(ring + _OFF["tail"], pos.to_bytes(8, "little"))
        head_moved = any(a.where.endswith(" head") for a in self.findings[n_found:])
        self._counters(cpu, st, h, head_moved)

    def _counters(self, cpu: int, st: RingState, h: L.RingHeader, head_moved: bool) -> None:
        """Counters only grow; drops never outpace hits; hits balance records + drops.
        ``head_moved``: head was already found forged in this drain (the balance would
        only say it again)."""
        now = {name: int(getattr(h, name)) for name in COUNTERS}
        delta = {name: (now[name] - st.last[name]) % U64 for name in COUNTERS}
        forged = head_moved
        for name in COUNTERS:
            if delta[name] >= 1 << 63:
                self._find(cpu, name, name, f">= {st.last[name]}",
                           f"{now[name]} (went backwards)")  # fmt: skip
                forged = True
        if delta["drops"] >= 1 << 63:
            pass
        elif delta["drops"] > delta["hits"] + 1:
            self._find(cpu, "drops", "drops", f"at most {delta['hits'] + 1} new drops",
                       f"{delta['drops']} new drops (more than hits)")  # fmt: skip
            forged = True
        else:
            self.dropped += delta["drops"]
            self.total_dropped += delta["drops"]
        if not forged:
            # Every hit ends as a record or a drop; one may be in flight (or read before
            # its record when the header is copied mid-update).
            gap = _since(now["hits"], st.base_hits) - (
                _since(int(h.head), st.base_head) + _since(now["drops"], st.base_drops)
            )
            if -1 <= gap <= 1:
                st.last.update(now)
                return
            self._find(cpu, "balance", "hits", "hits = records + drops",
                       f"{gap:+d} hits unaccounted for (counters forged, or the agent "
                       "switched off while hits were faked)")  # fmt: skip
        self._rebase(st, h)

    # -- in-flight flag (once per check interval) -------------------------------------------

    def check_inflight(self) -> None:
        """A flag that stays set across two checks while hits stand still was forged: it
        would switch the agent off on that CPU (it takes the flag for a re-entry)."""
        for cpu in range(self.ncpus):
            h = self.header(cpu)
            st = self.state[cpu]
            before, st.seen_inflight = st.seen_inflight, (int(h.inflight), int(h.hits))
            if h.inflight and before is not None and before[0] and before[1] == h.hits:
                self._find(cpu, "inflight", "inflight", "0", f"{h.inflight} (stuck)", fix=0)
