"""A hostile guest kernel cannot blind or fool the security space silently (issue 8, 3).

No VM here: the ring reader and the integrity checks are parsers and state machines over
guest memory, so these tests give them memory built in a bytearray (ring headers and
records written the way the agent writes them, page tables built by hand) and then do
what a guest kernel attacker would: move head back, set tail to head, reset or saturate
the drop counter, forge the in-flight flag while faking hits, remap or unmap a page.
Every one of them must come out as an alert, and nothing may raise.
"""

from __future__ import annotations

import ctypes as C
import fnmatch
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from vmshield.errors import MemoryAccessError
from vmshield.guest.paging import PageWalker
from vmshield.objects.filters import match_filter
from vmshield.space import layout as L
from vmshield.space.alert import Alert
from vmshield.space.base import PAGE, Region, SiteState
from vmshield.space.rings import AgentModel, RingReader
from vmshield.space.space import SecuritySpace

RING = L.RING_MIN  # bytes of records per CPU
REC = 128  # every record here: header, 6 arguments (the size of a kfunc record)
NSLOTS = RING // REC  # records a ring holds
RINGS_VA = 0x10000
STRIDE = L.ring_bytes(RING)
H = {name: getattr(L.RingHeader, name).offset for name, *_ in L.RingHeader._fields_}


def at(n: int) -> int:
    """Offset of the ``n``-th record of a ring of REC-byte records, from its start."""
    return L.data_offset() + (n * REC) % RING


class RingMemory:
    """One or more rings in a bytearray; ``agent_hit`` does what vms_agent() does."""

    def __init__(self, ncpus: int = 1) -> None:
        self.buf = bytearray(ncpus * STRIDE)
        self.reader = RingReader(self.read, self.write, lambda va: va, RINGS_VA, STRIDE,
                                 ncpus, RING)  # fmt: skip
        self.agents = [AgentModel(self.buf, RING, cpu * STRIDE) for cpu in range(ncpus)]

    def read(self, va: int, n: int) -> bytes:
        off = va - RINGS_VA
        if off < 0 or off + n > len(self.buf):
            raise MemoryAccessError(f"{va:#x} outside the rings")
        return bytes(self.buf[off : off + n])

    def write(self, va: int, data: bytes) -> None:
        off = va - RINGS_VA
        self.buf[off : off + len(data)] = data

    def get(self, name: str, cpu: int = 0) -> int:
        off = cpu * STRIDE + H[name]
        return int.from_bytes(self.buf[off : off + 8], "little")

    def set(self, name: str, value: int, cpu: int = 0) -> None:
        off = cpu * STRIDE + H[name]
        self.buf[off : off + 8] = (value % (1 << 64)).to_bytes(8, "little")

    def agent_hit(self, pid: int, cpu: int = 0) -> None:
        rec = L.Record()
        rec.pid, rec.cpu, rec.matched = pid, cpu, 1
        self.agents[cpu].hit(rec, (0,) * 6, max_size=REC)

    def drain(self) -> list[int]:
        return [L.Record.from_buffer_copy(raw).pid for raw in self.reader.drain()]

    def findings(self) -> list[Alert]:
        return self.reader.take_findings()

    def apply(self, alerts: list[Alert]) -> None:
        """What repair() does with an alert's fix (pa == va here)."""
        for a in alerts:
            for at, value in a.fix:
                self.write(at, value)


def hits(m: RingMemory, pids: range, cpu: int = 0) -> None:
    for p in pids:
        m.agent_hit(p, cpu)


def test_records_once_in_order_and_the_tail_published() -> None:
    m = RingMemory(2)
    hits(m, range(1, 6))
    hits(m, range(100, 103), cpu=1)
    assert m.drain() == [1, 2, 3, 4, 5, 100, 101, 102]
    assert m.get("tail") == 5 * REC and m.get("tail", 1) == 3 * REC
    assert m.drain() == [] and m.findings() == []
    hits(m, range(6, 6 + 3 * NSLOTS))  # fill and overflow: drops, counted by the host
    assert len(m.drain()) == NSLOTS
    assert m.findings() == [] and m.reader.take_dropped() == 2 * NSLOTS


def test_head_moved_backwards_replays_nothing() -> None:
    m = RingMemory()
    hits(m, range(1, 9))
    assert m.drain() == list(range(1, 9))
    m.set("head", 2 * REC)  # the slots of records 3..8 still hold them
    assert m.drain() == []
    (alert,) = m.findings()
    assert alert.where == "cpu 0 ring head" and "backwards" in alert.found
    hits(m, range(9, 12))  # the agent sees a full ring: drops, reported, not lost silently
    assert m.drain() == [] and m.findings() == [] and m.reader.take_dropped() == 3
    m.apply([alert])  # --on-tamper rearm puts head back where the host is
    hits(m, range(12, 15))
    assert m.drain() == [12, 13, 14]
    assert m.findings() == []  # the jump forward of the repair is not a forged record


def test_tail_set_to_head_hides_nothing() -> None:
    m = RingMemory()
    hits(m, range(1, 6))
    m.set("tail", m.get("head"))
    assert m.drain() == [1, 2, 3, 4, 5]  # read from the host's own position
    (alert,) = m.findings()
    assert alert.where == "cpu 0 ring tail"


def test_tail_forged_so_the_agent_laps_the_host_is_an_alert() -> None:
    m = RingMemory()
    hits(m, range(1, 5))
    m.set("tail", m.get("head"))  # records 1..4 unread, and the agent may overwrite them
    hits(m, range(5, 5 + NSLOTS))
    got = m.drain()
    assert 1 not in got  # overwritten: they cannot be shown ...
    alerts = m.findings()
    assert any("overwritten" in a.found for a in alerts)  # ... but not silently
    assert any(a.where == "cpu 0 ring tail" for a in alerts)
    hits(m, range(100, 103))
    assert m.drain() == [100, 101, 102] and m.findings() == []


def test_head_forged_ahead_shows_no_stale_slot() -> None:
    m = RingMemory()
    hits(m, range(1, 4))
    assert m.drain() == [1, 2, 3]
    m.set("head", (3 + NSLOTS) * REC)  # every slot below holds a record of another position
    assert m.drain() == []
    assert m.findings()
    hits(m, range(7, 9))
    assert m.drain() == [7, 8] and m.findings() == []


def test_a_record_shown_at_another_position_is_refused() -> None:
    m = RingMemory()
    hits(m, range(1, 3))
    assert m.drain() == [1, 2]
    # Forge the next slot with a copy of record 1 and publish it.
    first = m.buf[at(0) : at(1)]
    m.buf[at(2) : at(3)] = first
    m.set("head", 3 * REC)
    m.set("hits", m.get("hits") + 1)
    m.set("records", m.get("records") + 1)
    assert m.drain() == []
    assert any("replayed" in a.found for a in m.findings())


def test_drop_counter_reset_does_not_hide_later_drops() -> None:
    m = RingMemory()
    hits(m, range(1, 2 + NSLOTS))  # one drop
    m.drain()
    assert m.reader.take_dropped() == 1
    m.set("drops", 0)
    m.drain()
    assert any("backwards" in a.found and a.where.endswith("drops") for a in m.findings())
    hits(m, range(0, NSLOTS + 2))  # NSLOTS records, 2 drops
    m.drain()
    assert m.reader.take_dropped() == 2 and m.findings() == []


def test_drop_counter_saturated_does_not_hide_later_drops() -> None:
    m = RingMemory()
    m.set("drops", (1 << 64) - 1)
    m.drain()
    assert any(a.where.endswith("drops") for a in m.findings())
    hits(m, range(0, NSLOTS + 3))  # the counter wraps to 2
    m.drain()
    assert m.reader.take_dropped() == 3 and m.findings() == []
    assert m.get("drops") == 2


def test_counters_going_backwards_are_alerts() -> None:
    m = RingMemory()
    hits(m, range(1, 4))
    m.drain()
    for name in ("hits", "nested", "denied", "killed"):
        m.set(name, m.get(name) - 1)
        m.drain()
        assert any(a.where.endswith(name) for a in m.findings()), name
        m.set(name, m.get(name) + 1)
        m.drain()
        m.findings()


def test_inflight_forged_while_hits_are_faked() -> None:
    """The flag switches the agent off on that CPU (every hit becomes a 'nested' one);
    an attacker also raising hits to look alive leaves hits without records."""
    m = RingMemory()
    hits(m, range(1, 4))
    m.drain()
    m.set("inflight", 1)
    for _ in range(5):
        m.agent_hit(0)
        m.set("hits", m.get("hits") + 1)  # faked
    assert m.drain() == []
    assert any("unaccounted" in a.found for a in m.findings())


def test_inflight_stuck_while_hits_stand_still() -> None:
    m = RingMemory()
    m.reader.check_inflight()
    m.set("inflight", 1)
    m.agent_hit(7)  # swallowed
    m.reader.check_inflight()
    assert m.findings() == []  # seen once: could be an agent run in flight
    m.reader.check_inflight()
    (alert,) = m.findings()
    assert alert.where == "cpu 0 ring inflight" and alert.fix
    m.apply([alert])
    m.agent_hit(8)
    assert m.drain() == [8]


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=C.sizeof(L.RingHeader), max_size=C.sizeof(L.RingHeader)),
       st.integers(0, 3 * NSLOTS))  # fmt: skip
def test_hostile_headers_never_raise_and_stay_bounded(header: bytes, n: int) -> None:
    m = RingMemory()
    hits(m, range(n))
    m.drain()
    m.buf[: len(header)] = header
    got = m.drain()
    assert len(got) <= NSLOTS
    m.findings()
    hits(m, range(3))
    m.drain()


# -- page tables: every protected page is checked through a fresh walk ------------------

RAM = 4 << 20
ROOT, PDPT, PD, PT = 0x1000, 0x2000, 0x3000, 0x4000
BASE = 0xFFFFFFFFC0000000  # PML4 511, PDPT 511, PD 0: one page table maps the region
FRAMES = 0x100000  # the region's frames start here
P, RW, NX = 1, 2, 1 << 63


class PhysMem:
    def __init__(self) -> None:
        self.buf = bytearray(RAM)

    def read(self, pa: int, n: int) -> bytes:
        if pa < 0 or pa + n > RAM:
            raise MemoryAccessError(f"{pa:#x} is outside guest RAM")
        return bytes(self.buf[pa : pa + n])

    def write(self, pa: int, data: bytes) -> None:
        if pa < 0 or pa + len(data) > RAM:
            raise MemoryAccessError(f"{pa:#x} is outside guest RAM")
        self.buf[pa : pa + len(data)] = data

    def u64(self, pa: int) -> int:
        return int.from_bytes(self.buf[pa : pa + 8], "little")

    def put(self, pa: int, value: int) -> None:
        self.buf[pa : pa + 8] = value.to_bytes(8, "little")


class FakeTarget:
    def __init__(self, mem: PhysMem, tmp: Path) -> None:
        self.mem = mem
        self.tmp = tmp

    def gdb_path(self) -> Path:
        return self.tmp / "gdb.sock"


class FakeKernel:
    """What the checks use of a kernel: a page walker and a symbol table (empty)."""

    def __init__(self, mem: PhysMem) -> None:
        self.walker = PageWalker(mem.read, ROOT)
        self.symbols: dict[str, int] = {}

    def read(self, va: int, n: int) -> bytes:
        return self.walker.read(va, n)

    def own_table_walker(self) -> PageWalker | None:
        return None  # no init_top_pgt in this model: the space walks from ROOT


def pte_of(va: int) -> int:
    return PT + ((va >> 12) & 0x1FF) * 8


def space(tmp_path: Path) -> tuple[PhysMem, SecuritySpace]:
    """A space of 1 text page, 1 config page and one 1-CPU ring, mapped as built; plus a
    'kernel text' page holding a patched site."""
    mem = PhysMem()
    mem.put(ROOT + 511 * 8, PDPT | P | RW)
    mem.put(PDPT + 511 * 8, PD | P | RW)
    mem.put(PD + 0, PT | P | RW)
    config_pages = -(-C.sizeof(L.Config) // PAGE)
    region = Region(BASE, 1, config_pages, STRIDE, 1, RING)
    npages = region.size // PAGE
    region.pages = [FRAMES + i * PAGE for i in range(npages)]
    for i, pa in enumerate(region.pages):
        flags = P | (0 if i == 0 else NX) | (RW if i > config_pages else 0)
        mem.put(pte_of(BASE + i * PAGE), pa | flags)
    site_va = BASE + 0x100000  # PT index 256: "kernel text", read-only, executable
    mem.put(pte_of(site_va), 0x300000 | P)
    mem.write(0x300000 + 0x10, bytes.fromhex("e812345678"))
    t: Any = FakeTarget(mem, tmp_path)
    k: Any = FakeKernel(mem)
    sp = SecuritySpace(t, k)
    sp.region = region
    sp._image_bytes = bytes(PAGE)
    sp._record_region()
    sp._start_rings()
    sp.sites = [SiteState(0, "security_file_open", site_va + 0x10, "0f1f440000",
                          "e812345678", None, 0, 0, live=True)]  # fmt: skip
    sp._record(site_va + 0x10, "security_file_open")
    sp._rehash()
    return mem, sp


def test_integrity_clean_when_nothing_changed(tmp_path: Path) -> None:
    _mem, sp = space(tmp_path)
    assert sp.check(deep=True) == []
    assert len(sp.frames) == sp.region.size // PAGE + 1  # type: ignore[union-attr]


def test_ring_page_remapped_is_a_pte_alert_with_its_repair(tmp_path: Path) -> None:
    mem, sp = space(tmp_path)
    ring_page = sp.region.rings_va  # type: ignore[union-attr]
    good = mem.u64(pte_of(ring_page))
    mem.put(pte_of(ring_page), 0x200000 | P | RW | NX)  # the agent now writes elsewhere
    alerts = sp.check(deep=True)
    (a,) = [a for a in alerts if a.what == "pte"]
    assert a.address == ring_page and a.where == "security space ring"
    assert a.fix == ((pte_of(ring_page), good.to_bytes(8, "little")),)
    for at, value in a.fix:
        mem.write(at, value)
    sp.walker.flush()
    assert sp.check(deep=True) == []


def test_unmapped_pages_are_alerts_not_exceptions(tmp_path: Path) -> None:
    mem, sp = space(tmp_path)
    mem.put(pte_of(sp.region.rings_va + PAGE), 0)  # type: ignore[union-attr]
    mem.put(pte_of(sp.sites[0].address), 0x7FFFF000 | P)  # a site page outside guest RAM
    alerts = sp.check(deep=True)
    where = {a.where: a for a in alerts if a.what == "pte"}
    assert "not mapped" in where["security space ring"].found
    assert "security_file_open" in where
    mem.put(PD, 0xFFFFF000 | P | RW)  # the whole page table outside RAM
    alerts = sp.check(deep=True)
    assert {a.what for a in alerts} == {"pte"}
    assert all("unreadable" in a.found for a in alerts)


def test_site_page_remapped_to_a_shadow_copy(tmp_path: Path) -> None:
    """The guest maps the site's page to a copy that still holds our call: the content
    check alone would see nothing, the frame check does."""
    mem, sp = space(tmp_path)
    site = sp.sites[0].address
    mem.write(0x380000, mem.read(0x300000, PAGE))
    mem.put(pte_of(site), 0x380000 | P)
    alerts = sp.check(deep=True)
    assert [a.where for a in alerts if a.what == "pte"] == ["security_file_open"]
    mem.write(0x300000 + 0x10, bytes(5))  # and the original page changed: seen too
    assert any(a.what == "site" for a in sp.check())


def test_text_page_made_writable_is_a_pte_alert(tmp_path: Path) -> None:
    mem, sp = space(tmp_path)
    mem.put(pte_of(BASE), mem.u64(pte_of(BASE)) | RW)
    (a,) = sp.check(deep=True)
    assert a.what == "pte" and "rw=True" in a.found


def test_ring_forgery_reaches_check(tmp_path: Path) -> None:
    mem, sp = space(tmp_path)
    assert sp.rings is not None and sp.region is not None
    ring = sp.region.pa(sp.region.rings_va)
    head = ring + H["head"]
    list(sp.drain())
    mem.put(ring + H["drops"], (1 << 64) - 1)
    list(sp.drain())
    assert any(a.what == "ring-state" for a in sp.check())
    mem.put(head, 5 * REC)  # published records that the agent never wrote
    assert list(sp.drain()) == []
    assert any("overwritten or forged" in a.found for a in sp.check())


# -- paths: a deep or long path must not walk around a deny rule --------------------------


def test_truncated_path_matches_a_prefix_rule_in_the_host_filter() -> None:
    deep = "/tmp/" + "d/" * 300 + "f"
    cut = {"path": deep[:399], "path_truncated": True}
    assert match_filter("path", "/tmp/*", cut, {})
    assert match_filter("path", "/tmp/d/*.txt", cut, {})  # could match: fail closed
    assert not match_filter("path", "/etc/*", cut, {})
    assert not fnmatch.fnmatchcase(".../f", "/tmp/*")
    assert match_filter("path", "/etc/*", {"path": ".../f", "path_truncated": True}, {})
    assert match_filter("path", "/tmp/*", {"path": deep}, {})
    assert not match_filter("path", "/tmp/x*", {"path": deep}, {})


def _sample(mem: PhysMem, sp: SecuritySpace, idt_base: int) -> None:
    """A CPU sample in ring 0's header, as the agent writes it."""
    assert sp.region is not None
    s = L.CpuSample()
    s.count, s.idt_base, s.idt_limit = 1, idt_base, 0xFFF
    mem.write(sp.region.pa(sp.region.rings_va) + L.RingHeader.sample.offset, bytes(s))


def test_idtr_alias_must_map_idt_table(tmp_path: Path) -> None:
    """The CPU reaches the IDT through IDTR (a read-only alias): an alias of another
    frame is a forged IDT the table check would never read."""
    mem, sp = space(tmp_path)
    table, alias = BASE + 0x101000, BASE + 0x102000
    mem.put(pte_of(table), 0x310000 | P | RW | NX)
    mem.put(pte_of(alias), 0x320000 | P | NX)
    sp.tables = {"idt_table": (table, bytes(PAGE))}
    sp._record(table, "idt_table")
    _sample(mem, sp, alias)
    (a,) = sp.check(deep=True)
    assert a.what == "pte" and a.where == "cpu 0 IDT (IDTR)" and "idt_table" in a.expected
    mem.put(pte_of(alias), 0x330000 | P | NX)  # and once recorded, a remap is seen too
    assert [a.where for a in sp.check(deep=True)] == ["cpu 0 IDT (IDTR)"]


def test_idtr_alias_of_idt_table_is_fine(tmp_path: Path) -> None:
    mem, sp = space(tmp_path)
    table, alias = BASE + 0x101000, BASE + 0x102000
    mem.put(pte_of(table), 0x310000 | P | RW | NX)
    mem.put(pte_of(alias), 0x310000 | P | NX)
    sp.tables = {"idt_table": (table, bytes(PAGE))}
    sp._record(table, "idt_table")
    _sample(mem, sp, alias)
    assert sp.check(deep=True) == []


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([ROOT, PDPT, PD, PT]), st.integers(0, 511),
                          st.integers(0, (1 << 64) - 1)), min_size=1, max_size=8))  # fmt: skip
def test_forged_page_tables_give_alerts_never_exceptions(
    tmp_path_factory: Any, writes: list[tuple[int, int, int]]
) -> None:
    mem, sp = space(tmp_path_factory.mktemp("pt"))
    for table, index, value in writes:
        mem.put(table + index * 8, value)
    sp.walker.flush()
    for alert in sp.check(deep=True):
        assert isinstance(alert, Alert)
    list(sp.drain())
    sp.check()


def test_foreign_kernel_half_seen_by_the_agent_is_an_alert_once(tmp_path: Path) -> None:
    """The agent compares the running task's page directory with the kernel's own and
    counts mismatches (pgd_bad); each new one is an alert naming the entry."""
    mem, sp = space(tmp_path)
    assert sp.region is not None
    s = L.CpuSample()
    s.count, s.cr3, s.pgd_bad, s.pgd_index, s.pgd_found = 1, 0x7000, 1, 300, 0x2
    mem.write(sp.region.pa(sp.region.rings_va) + L.RingHeader.sample.offset, bytes(s))
    (a,) = [a for a in sp.check() if "page directory" in a.where]
    assert a.where == "cpu 0 page directory 0x7000 (CR3) entry 300" and a.found == "0x2"
    assert a.address == 0xFFFF960000000000 and not a.fix  # reported: the task may be gone
    assert [a for a in sp.check() if "page directory" in a.where] == []
