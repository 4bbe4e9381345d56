"""The host's reader of the agent's per-CPU rings, which the guest can scribble on.

A ring header lives in guest memory that the guest kernel can write, so nothing in it is
taken on trust. The host keeps its own copy of everything it needs, per CPU:

- its read position (the tail it publishes): records are read from there, never from
  the guest's ``tail``, and the position never goes back, so a head moved backwards
  cannot replay records, and a tail moved up to head cannot make the host skip them;
- the byte position of the next record: each record carries ``seq``, derived from the
  position the agent wrote it at (:func:`layout.record_seq`; a zeroed ring holds no
  record), so a record shown at another position (replayed, overwritten after a forged
  tail, or forged) is refused; its ``size`` must be a multiple of 8 within the
  record bounds, end before head and not run past the ring's end, and a pad record must
  reach exactly to the ring's end: a record that is not all of that is forged, and
  nothing from it up to head is read;
- the last value of every counter: ``hits``, ``drops``, ``nested``, ``denied``,
  ``killed``, ``records``, ``filtered``, ``aggregated`` only grow, ``drops`` never grows
  faster than ``hits`` (each drop is a hit), and every hit ends as a published record, a
  drop, filtered out or counted in the aggregation table in the guest, so hits that rise
  with nothing to show (the agent switched off by a forged in-flight flag, with hits
  forged to look alive) are seen as well.

Anything that goes the wrong way is an :class:`Alert` (``ring-state``); the host then
re-bases on what it found, so a reset or saturated drop counter still reports later
drops. A forged in-flight flag is caught by :meth:`RingReader.check_inflight`, once per
check interval: the agent runs with interrupts off, so a flag that stays set while the
CPU's hit count stands still was not set by the agent.
"""

from __future__ import annotations

import ctypes as C
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from vmshield.space import layout as L
from vmshield.space.alert import Alert

ReadVa = Callable[[int, int], bytes]
WriteVa = Callable[[int, bytes], None]
PaOf = Callable[[int], int]

U64 = 1 << 64
COUNTERS = ("hits", "drops", "nested", "denied", "killed", "records", "filtered", "aggregated")
_HSIZE = C.sizeof(L.RingHeader)
_OFF = {n: getattr(L.RingHeader, n).offset for n in ("head", "tail", "inflight", *COUNTERS)}
_SIZE_SEQ = struct.Struct("<II")  # the first 8 bytes of every record, pad included
DRAIN_LIMIT = 64 << 20  # bytes read per CPU and drain: bounds one drain's work


def _uniform_run(blob: bytes, seq: int) -> list[bytes] | None:
    """The records of ``blob`` if they all have the size of the first and the seqs of
    their positions (a burst from one point: every record alike), checked in C: the
    size and seq words seen as two strided views of the blob, compared as lists with
    the expected ones. None: read them one by one (any other run, a pad, a forged
    record, a seq that wraps)."""
    if len(blob) < 8:
        return None
    rsize = _SIZE_SEQ.unpack_from(blob, 0)[0]
    if rsize & (7 | L.PAD_FLAG) or not L.RECORD_HEADER <= rsize <= L.RECORD_MAX:
        return None
    k, rest = divmod(len(blob), rsize)
    step = rsize >> 3
    if rest or seq + k * step > 0xFFFFFFFF:
        return None
    words = memoryview(blob).cast("I")  # little-endian host (x86-64, like the guest)
    stride = rsize >> 2
    if words[0::stride].tolist() != [rsize] * k:
        return None
    if words[1::stride].tolist() != list(range(seq, seq + k * step, step)):
        return None
    return [blob[i : i + rsize] for i in range(0, len(blob), rsize)]


def _since(now: int, then: int) -> int:
    """How far a 64-bit counter moved, as the agent's wrapping arithmetic has it."""
    d = (now - then) % U64
    return d - U64 if d >= 1 << 63 else d


@dataclass
class RingState:
    """The host's own copy of one CPU's ring state."""

    pos: int = 0  # next position to read; the tail the host publishes
    last: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0))
    # Balance baseline: hits == records + drops + filtered (+1 for a hit in flight).
    base_hits: int = 0
    base_rest: int = 0  # records + drops + filtered
    standing: set[str] = field(default_factory=set)  # findings reported, not yet gone
    back_head: int = 0  # the guest's head while it stands behind pos
    seen_inflight: tuple[int, int] | None = None  # (inflight, hits) at the last check


class RingReader:
    """Drains and checks the rings of one security space.

    ``read``/``write`` address guest memory by virtual address inside the space (the
    space maps them to the frames it recorded); ``pa`` gives the physical address of a
    virtual one, for the repairs carried by alerts. ``ring_size``: bytes of records per
    CPU (a power of two).
    """

    def __init__(
        self, read: ReadVa, write: WriteVa, pa: PaOf, rings_va: int, stride: int, ncpus: int,
        ring_size: int,
    ) -> None:  # fmt: skip
        self.read, self.write, self.pa = read, write, pa
        self.rings_va, self.stride, self.ncpus = rings_va, stride, ncpus
        self.ring_size = L.check_ring_size(ring_size)
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
        st.base_hits = int(h.hits)
        st.base_rest = int(h.records) + int(h.drops) + int(h.filtered) + int(h.aggregated)
        for name in COUNTERS:
            st.last[name] = int(getattr(h, name))

    def aggregates(self, cpu: int) -> list[tuple[int, L.AggSlot]]:
        """The claimed slots of ``cpu``'s aggregation table, by index (bounded: the table
        has ``AGG_SLOTS`` lines; the caller checks that counts only grow)."""
        n = C.sizeof(L.AggSlot)
        raw = self.read(self.ring(cpu) + L.agg_offset(self.ring_size), L.AGG_SLOTS * n)
        out = []
        for i in range(L.AGG_SLOTS):
            slot = L.AggSlot.from_buffer_copy(raw, i * n)
            if slot.count:
                out.append((i, slot))
        return out

    def fill(self, cpu: int) -> float:
        """How full the ring of ``cpu`` is for the host (0..1, from the guest's head and
        the host's own position): the drain loop shortens its interval as it rises."""
        h = self.header(cpu)
        return min(1.0, max(0, int(h.head) - self.state[cpu].pos) / self.ring_size)

    # -- drain ------------------------------------------------------------------------------

    def drain(self, limit: int = DRAIN_LIMIT) -> Iterator[bytes]:
        """Records published since the last drain (each one's bytes: header, arguments,
        items), per CPU in ring order; each is yielded once whatever the guest does to
        the header. Pads are skipped. Findings and drops accumulate."""
        for cpu in range(self.ncpus):
            yield from self._drain_cpu(cpu, limit)

    def _drain_cpu(self, cpu: int, limit: int) -> Iterator[bytes]:
        st = self.state[cpu]
        ring = self.ring(cpu)
        size = self.ring_size
        h = self.header(cpu)
        head, tail = int(h.head), int(h.tail)
        n_found = len(self.findings)
        if tail != st.pos:
            self._find(cpu, "tail", "tail", f"{st.pos}", f"{tail} (not the host's tail)")
        if head < st.pos:
            # Moved backwards: the bytes below our position were read already; reading them
            # again would replay them. The agent sees a full ring and counts drops until
            # head is put back.
            self._find(cpu, "head-back", "head", f">= {st.pos}", f"{head} (moved backwards)",
                       fix=st.pos, standing=True)  # fmt: skip
            st.back_head = head
            end = st.pos
        else:
            if "head-back" in st.standing:  # repaired: the jump forward is ours, not records
                st.standing.discard("head-back")
            end = min(head, st.pos + size)
        if head - st.pos > size:
            self._find(cpu, "head-ahead", "head", f"<= {st.pos + size}",
                       f"{head} (more than a ring ahead of the host)")  # fmt: skip
        if head & 7:
            self._find(cpu, "head-align", "head", "a multiple of 8", f"{head}")
            end = st.pos
        end = min(end, st.pos + limit)
        pos = st.pos
        base = ring + L.data_offset()
        unpack = _SIZE_SEQ.unpack_from
        lo, hi = L.RECORD_HEADER, L.RECORD_MAX
        while pos < end:
            # One read per contiguous run of bytes (up to the ring's end); the records of
            # a run are cut out in one tight loop (the hot path of a burst: every name
            # it uses is local, the expected seq advances with the position).
            first = pos & (size - 1)
            count = min(end - pos, size - first)
            blob = self.read(base + first, count)
            expect = (pos >> 3) + 1
            uniform = _uniform_run(blob, expect & 0xFFFFFFFF)  # seqs are 32-bit
            if uniform is not None:
                yield from uniform
                pos += count
                continue
            out: list[bytes] = []
            at = 0
            bad = ""
            while at < count:
                if count - at < 8:
                    bad = f"{count - at} bytes left before head: no record fits"
                    break
                rsize, seq = unpack(blob, at)
                if seq != expect & 0xFFFFFFFF:
                    bad = (f"record #{seq - 1} at byte {pos + at} (replayed, overwritten "
                           "or forged)")  # fmt: skip
                    break
                if rsize & L.PAD_FLAG:
                    if (rsize & ~L.PAD_FLAG) != count - at or first + count != size:
                        bad = f"a pad of {rsize & ~L.PAD_FLAG} bytes at byte {pos + at} (forged)"
                        break
                    at = count
                    break
                if rsize & 7 or rsize < lo or rsize > hi or at + rsize > count:
                    bad = f"a record of {rsize} bytes at byte {pos + at} (forged)"
                    break
                out.append(blob[at : at + rsize])
                at += rsize
                expect += rsize >> 3
            yield from out
            if bad:
                # Nothing from here to head is trusted: skipped, and said.
                self._find(cpu, "seq", "head", f"a record at byte {pos + at}",
                           f"{bad}; {max(0, head - pos - at)} bytes skipped")  # fmt: skip
                pos = head  # aligned, and beyond pos + at (the loop runs only below head)
                break
            pos += count
        st.pos = max(st.pos, pos)
        self.write(ring + _OFF["tail"], st.pos.to_bytes(8, "little"))
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
            # Every hit ends as a record, a drop or filtered; one may be in flight (or
            # read before its record when the header is copied mid-update).
            rest = now["records"] + now["drops"] + now["filtered"] + now["aggregated"]
            gap = _since(now["hits"], st.base_hits) - _since(rest, st.base_rest)
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


class AgentModel:
    """What ``vms_agent()`` does to one ring, in Python: the reference writer for the
    format tests and for the benchmark's recorded rings (bytes built with the real
    layout, no VM). ``mem`` is the ring (header first) as a bytearray."""

    def __init__(self, mem: bytearray, ring_size: int, offset: int = 0) -> None:
        self.mem, self.size, self.at = mem, L.check_ring_size(ring_size), offset

    def get(self, name: str) -> int:
        o = self.at + _OFF[name]
        return int.from_bytes(self.mem[o : o + 8], "little")

    def set(self, name: str, value: int) -> None:
        o = self.at + _OFF[name]
        self.mem[o : o + 8] = (value % U64).to_bytes(8, "little")

    def bump(self, name: str) -> None:
        self.set(name, self.get(name) + 1)

    def hit(self, rec: L.Record, args: tuple[int, ...] = (), items: bytes = b"",
            max_size: int = L.RECORD_MAX, wanted: bool = True) -> bool:  # fmt: skip
        """One hit: the record (header fields as given; size, seq, nargs filled here),
        published unless the ring is full (a drop) or ``wanted`` is false (filtered).
        ``items`` is the already encoded item area (see :func:`encode_items`)."""
        if self.get("inflight"):
            self.bump("nested")
            return False
        self.bump("hits")
        if not wanted:
            self.bump("filtered")
            return False
        head, tail, size = self.get("head"), self.get("tail"), self.size
        need = min(max_size, L.RECORD_MAX)
        off = head & (size - 1)
        pad = size - off if size - off < need else 0
        if (head - tail) % U64 + pad + need > size:
            self.bump("drops")
            return False
        rec.nargs = len(args)
        body = bytes(rec)[8:] + struct.pack(f"<{len(args)}Q", *args) + items
        total = 8 + len(body)
        if total % 8 or total > need:
            raise ValueError(f"a record of {total} bytes (max {need}, multiple of 8)")
        base = self.at + L.data_offset()
        if pad:
            self.mem[base + off : base + off + 8] = _SIZE_SEQ.pack(
                pad | L.PAD_FLAG, L.record_seq(head)
            )
            off = 0
        seq = L.record_seq(head + pad)
        self.mem[base + off : base + off + total] = _SIZE_SEQ.pack(total, seq) + body
        self.bump("records")
        self.set("head", head + pad + total)
        return True


def encode_items(items: list[tuple[int, int, bytes]]) -> bytes:
    """Items as the agent lays them out: ``u16 len, u8 kind, u8 status``, data, 8-aligned."""
    out = bytearray()
    for kind, status, data in items:
        out += struct.pack("<HBB", len(data), kind, status) + data
        out += bytes(-len(out) % 8)
    return bytes(out)
