"""Variable-size records (issue 12): what the agent writes is what the host reads.

No VM: :class:`AgentModel` writes rings the way ``vms_agent()`` does (reserve the site's
largest record, pad to the ring's end when it does not fit, publish by moving head), the
host's :class:`RingReader` reads them. Any sequence of records comes back exactly, in
order, across wraps; records cut short, forged sizes, forged pads and forged seqs are
refused with an alert, never an exception. The decoder's JSON lines are the same text
as ``Event.to_json()`` of the same event, and its unvalidated events equal validated
ones.
"""

from __future__ import annotations

import json
import struct
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmshield.monitor.events import Event, PointInfo, ProcessContext, trusted_maker
from vmshield.monitor.request import IsolationRequest
from vmshield.monitor.space_engine import SpaceStats, _agg_key_text, _rule, drain_interval
from vmshield.monitor.space_events import RecordDecoder, SiteDecoder, SiteRequest
from vmshield.objects.catalog import plan_for
from vmshield.space import layout as L
from vmshield.space import rings
from vmshield.space.rings import AgentModel, RingReader, encode_items

RING = L.RING_MIN
STRIDE = L.ring_bytes(RING)


class Ring:
    """One ring in a bytearray, the agent's model writing, the host's reader reading."""

    def __init__(self) -> None:
        self.buf = bytearray(STRIDE)
        self.agent = AgentModel(self.buf, RING)
        self.reader = RingReader(self.read, self.write, lambda va: va, 0, STRIDE, 1, RING)

    def read(self, va: int, n: int) -> bytes:
        if va < 0 or va + n > len(self.buf):
            raise ValueError("outside")
        return bytes(self.buf[va : va + n])

    def write(self, va: int, data: bytes) -> None:
        self.buf[va : va + len(data)] = data


record_spec = st.tuples(
    st.integers(-(1 << 31), (1 << 31) - 1),  # pid
    st.binary(max_size=15).map(lambda b: b.replace(b"\0", b"x")),  # comm (C string)
    st.lists(st.integers(0, (1 << 64) - 1), max_size=6),  # args
    st.lists(
        st.tuples(st.integers(1, 5), st.integers(0, 2), st.binary(max_size=200)), max_size=3
    ),  # items
)


def make(spec: tuple[int, bytes, list[int], list[tuple[int, int, bytes]]]) -> tuple[
    L.Record, tuple[int, ...], bytes
]:  # fmt: skip
    pid, comm, args, items = spec
    rec = L.Record()
    rec.pid, rec.comm, rec.nitems, rec.matched, rec.task = pid, comm, len(items), 1, 0xFFFF1
    return rec, tuple(args), encode_items(items)


def fields_of(raw: bytes) -> tuple[int, bytes, tuple[int, ...], bytes]:
    rec = L.Record.from_buffer_copy(raw)
    args = struct.unpack_from(f"<{rec.nargs}Q", raw, L.RECORD_HEADER)
    comm = raw[L.Record.comm.offset : L.Record.comm.offset + L.COMM_LEN]
    return rec.pid, comm, args, raw[L.RECORD_HEADER + 8 * rec.nargs :]


@settings(max_examples=150, deadline=None)
@given(st.lists(record_spec, max_size=60), st.integers(0, RING // 8), st.integers(1, 40))
def test_any_sequence_of_records_reads_back_exactly(
    specs: list[Any], skip: int, every: int
) -> None:
    """Records of every size, the host draining every ``every`` records, starting
    ``skip`` * 8 bytes into the ring so that wraps and pads happen."""
    r = Ring()
    start = (skip * 8) % RING + RING  # as if the ring had been written around once already
    r.agent.set("head", start)
    r.agent.set("tail", start)
    r.reader.state[0].pos = start
    wrote, got = [], []
    for i, spec in enumerate(specs):
        rec, args, items = make(spec)
        need = L.RECORD_HEADER + 8 * len(args) + len(items)
        if r.agent.hit(rec, args, items, max_size=need + 8 * (i % 3)):
            wrote.append((spec[0], spec[1].ljust(16, b"\0"), args, items))
        if i % every == 0:
            got += [fields_of(raw) for raw in r.reader.drain()]
    got += [fields_of(raw) for raw in r.reader.drain()]
    assert got == wrote
    assert r.reader.take_findings() == []
    assert r.reader.take_dropped() == r.agent.get("drops")


def test_a_full_ring_drops_and_counts_then_recovers() -> None:
    r = Ring()
    rec, args, items = make((7, b"x", [1, 2, 3, 4, 5, 6], []))
    n = 0
    while r.agent.hit(rec, args, items, max_size=128):
        n += 1
    assert n == RING // 128
    for _ in range(5):
        r.agent.hit(rec, args, items, max_size=128)
    assert len(list(r.reader.drain())) == n
    assert r.reader.take_dropped() == 6 and r.reader.take_findings() == []
    assert r.agent.hit(rec, args, items, max_size=128)
    assert len(list(r.reader.drain())) == 1


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 200), st.integers(0, 5), st.sampled_from([None, "seq", "size"]),
       st.integers(0, 1000))  # fmt: skip
def test_runs_of_alike_records_read_fast_and_checked_alike(
    n: int, nargs: int, forge: str | None, which: int
) -> None:
    """A burst from one point (records all alike) is cut out in one C pass; it is
    checked as strictly as one record at a time: a forged seq or size anywhere in it
    stops the run there with an alert, and the records before it are delivered."""
    r = Ring()
    start = RING - 8 * (which % 64)  # pads and wraps on the way
    for name in ("head", "tail"):
        r.agent.set(name, start)
    r.reader.state[0].pos = start
    rec, args, items = make((5, b"alike", list(range(nargs)), []))
    size = L.RECORD_HEADER + 8 * nargs
    written = []  # where each record starts
    for _ in range(n):
        if r.agent.hit(rec, args, items, max_size=size):
            written.append(r.agent.get("head") - size)
    if forge and written:
        i = which % len(written)
        at = L.data_offset() + written[i] % RING + (4 if forge == "seq" else 0)
        r.buf[at : at + 4] = (12345 if forge == "seq" else 7).to_bytes(4, "little")
        assert len(list(r.reader.drain())) == i  # the ones before it
        assert any(a.where.endswith(" head") for a in r.reader.take_findings())
        return
    got = list(r.reader.drain())
    assert len(got) == len(written) and r.reader.take_findings() == []
    assert all(fields_of(x)[0] == 5 for x in got)


def test_runs_after_32_gib_drained_still_take_the_fast_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The 32-bit seqs wrap after 32 GiB through a ring: a burst there is still one C
    pass (the expected seq is taken modulo 2**32, as the agent writes it)."""
    fast: list[int] = []
    real = rings._uniform_run

    def counting(blob: bytes, seq: int) -> list[bytes] | None:
        out = real(blob, seq)
        fast.append(out is not None)
        return out

    monkeypatch.setattr(rings, "_uniform_run", counting)
    r = Ring()
    start = (1 << 35) + 64 * 8  # past 2**32 records of 8 bytes
    for name in ("head", "tail"):
        r.agent.set(name, start)
    r.reader.state[0].pos = start
    rec, args, items = make((5, b"alike", [1, 2], []))
    n = sum(r.agent.hit(rec, args, items, max_size=L.RECORD_HEADER + 16) for _ in range(20))
    got = list(r.reader.drain())
    assert len(got) == n == 20 and r.reader.take_findings() == []
    assert fast and all(fast)


def test_pad_at_the_wrap_is_skipped_and_the_record_starts_at_zero() -> None:
    r = Ring()
    small = L.Record()
    small.matched = 1
    while RING - r.agent.get("head") % RING >= 200:
        r.agent.hit(small, max_size=L.RECORD_HEADER)
        list(r.reader.drain())
    before = r.agent.get("head")
    big, args, items = make((9, b"big", [], [(2, 0, b"p" * 300)]))
    assert r.agent.hit(big, args, items, max_size=L.RECORD_MAX)
    assert r.agent.get("head") == before + (RING - before % RING) + L.RECORD_HEADER + 304
    (raw,) = r.reader.drain()
    assert fields_of(raw)[0] == 9 and r.reader.take_findings() == []
    pad = struct.unpack_from("<II", r.buf, L.data_offset() + before % RING)
    assert pad == (RING - before % RING | L.PAD_FLAG, L.record_seq(before))


def _published(r: Ring, n: int = 3) -> None:
    rec, args, items = make((1, b"a", [1], [(1, 0, b"abc")]))
    for _ in range(n):
        r.agent.hit(rec, args, items, max_size=256)


def test_forged_size_is_refused_not_read() -> None:
    r = Ring()
    _published(r)
    first = L.data_offset()
    for bad in (0, 12, 79, L.RECORD_MAX + 8, 1 << 20):
        struct.pack_into("<I", r.buf, first, bad)
        r2 = RingReader(r.read, r.write, lambda va: va, 0, STRIDE, 1, RING)
        r.write(L.RingHeader.tail.offset, bytes(8))
        assert list(r2.drain()) == []
        (alert,) = [a for a in r2.take_findings() if "forged" in a.found]
        assert "bytes skipped" in alert.found


def test_truncated_record_past_head_is_refused() -> None:
    """A record whose size reaches past head (head forged short of its end)."""
    r = Ring()
    _published(r, 2)
    r.agent.set("head", r.agent.get("head") - 8)
    got = list(r.reader.drain())
    assert len(got) == 1
    assert any("forged" in a.found for a in r.reader.take_findings())


def test_forged_pad_is_refused() -> None:
    r = Ring()
    _published(r, 1)
    head = r.agent.get("head")
    struct.pack_into("<II", r.buf, L.data_offset() + head, 64 | L.PAD_FLAG, L.record_seq(head))
    r.agent.set("head", head + 64)
    list(r.reader.drain())
    assert any("pad" in a.found for a in r.reader.take_findings())


def test_unaligned_head_is_an_alert() -> None:
    r = Ring()
    _published(r, 1)
    r.agent.set("head", r.agent.get("head") + 3)
    assert list(r.reader.drain())[:1] == []
    assert any("multiple of 8" in a.expected for a in r.reader.take_findings())


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=8, max_size=4096), st.integers(0, RING // 8), st.integers(0, 40))
def test_hostile_ring_bytes_never_raise(junk: bytes, where: int, n: int) -> None:
    """Random bytes over published records and a head anywhere: bounded, no exception."""
    r = Ring()
    _published(r, n)
    off = L.data_offset() + (where * 8) % RING
    r.buf[off : off + len(junk)] = junk[: STRIDE - off]
    r.agent.set("head", where * 8 + 8 * (n % 7))
    total = sum(len(x) for x in r.reader.drain())
    assert total <= RING
    r.reader.take_findings()
    _published(r, 2)
    list(r.reader.drain())


# -- rules: every filter the agent can decide is decided there ---------------------------


def test_rules_exact_where_the_agent_can_decide() -> None:
    assert not _rule("log", {"pid": "12", "comm": "vm*", "uid": "0"}).has & L.R_HOST
    assert not _rule("log", {"path": "/etc/*", "port": "22"}).has & L.R_HOST
    for guest_side in ({"address": "127.*"}, {"port": "8*"}, {"comm": "[ab]*"},
                       {"escalation": "true"}, {"path": "/" + "x" * 200},
                       {"changed": "True"}):  # fmt: skip
        assert not _rule("log", guest_side).has & L.R_HOST, guest_side
    assert _rule("log", {"path": "/" + "x" * 224}).has & L.R_HOST  # too long for the rule


def test_drain_interval_follows_the_fill_level() -> None:
    assert drain_interval(0.0) == 0.02
    assert drain_interval(0.05) < 0.02
    assert drain_interval(0.2) == drain_interval(1.0) == 0.001


# -- the decoder: JSON lines equal to Event.to_json(), events equal to validated ones ------


def _decoder(obj: str, action: str = "log", exact: bool = True) -> tuple[RecordDecoder, Any]:
    req = IsolationRequest(vm="lab", object=obj, filters={"comm": "vm*"}, action=action)
    rr: Any = SimpleNamespace(request=req, point=SimpleNamespace(symbol="f", address=1 << 63))
    plan = plan_for(obj, SimpleNamespace(member_offset=lambda s, f: 8))
    site = SiteDecoder(0, plan, [SiteRequest(0, rr, 0, exact, action)], True)
    stats = SpaceStats()
    return RecordDecoder("lab", {0: site}, lambda ns: 1.7e9 + ns / 1e9, stats, None), stats


def _raw(obj: str, comm: bytes = b"vmstest", matched: int = 1) -> bytes:
    r = Ring()
    rec, args, items = make((42, comm, [0x10, 2, 3, 4, 5, 6], []))
    rec.ns, rec.cpu, rec.matched, rec.uid = 123456789, 0, matched, 1000
    if obj == "module.load":
        args, items, rec.nitems = (), encode_items([(L.F_KSTR, 0, b"ext4\0")]), 1
    r.agent.hit(rec, args, items)
    (raw,) = r.reader.drain()
    return raw


def test_json_lines_are_the_events_json() -> None:
    for obj, action in (("kfunc:__x64_sys_getpid", "log"), ("module.load", "kill")):
        dec, stats = _decoder(obj, action)
        lines: list[str] = []
        events: list[Event] = []
        dec.decode([_raw(obj)], lines.append, events.append)
        (line,), (ev,) = lines, events
        assert line == ev.to_json()
        valid = Event.model_validate(json.loads(line))
        assert valid == ev and valid.to_json() == line
        assert ev.process == ProcessContext(pid=42, tgid=0, ppid=0, uid=1000, euid=0, gid=0,
                                            comm="vmstest", task="0xffff1")  # fmt: skip
        assert stats.events == 1
    assert json.loads(line)["detail"] == {"signal": "SIGKILL"}
    assert json.loads(line)["fields"] == {"name": "ext4"}


@settings(max_examples=50, deadline=None)
@given(st.lists(st.lists(st.sampled_from([0, 1, 39, (1 << 64) - 1]), max_size=6), max_size=6))
def test_register_text_follows_every_record(regs: list[list[int]]) -> None:
    """The registers' text is reused while they repeat, and only then (any count of
    registers, the same ones again, none at all)."""
    r = Ring()
    for args in regs:
        rec = L.Record()
        rec.pid, rec.comm, rec.matched = 42, b"vmstest", 1
        r.agent.hit(rec, tuple(args))
    dec, stats = _decoder("kfunc:__x64_sys_getpid")
    lines: list[str] = []
    events: list[Event] = []
    dec.decode(list(r.reader.drain()), lines.append, events.append)
    assert [json.loads(x)["fields"]["args"] for x in lines] == [
        [hex(a) for a in args + [0] * (6 - len(args))] for args in regs
    ]
    assert lines == [e.to_json() for e in events] and stats.events == len(regs)


def test_trusted_maker_event_equals_a_validated_one() -> None:
    proc = ProcessContext(pid=1, tgid=1, ppid=0, uid=0, euid=0, gid=0, comm="a", task="0x1")
    point = PointInfo(symbol="s", address="0x1", kind="kernel-function", engine="space", cpu=0)
    ev = trusted_maker("vm", "r", "o", "log", point)(1.5, proc, {"a": [1]}, ["e"], {"d": 1})
    valid = Event(time=1.5, vm="vm", request="r", object="o", action="log", process=proc,
                  fields={"a": [1]}, point=point, decode_errors=["e"], detail={"d": 1})  # fmt: skip
    assert ev == valid and ev.to_json() == valid.to_json()
    assert ev.model_dump(by_alias=True) == valid.model_dump(by_alias=True)


def test_host_checks_what_the_agent_could_not() -> None:
    dec, stats = _decoder("kfunc:__x64_sys_getpid", exact=False)
    lines: list[str] = []
    dec.decode([_raw("kfunc:x", comm=b"other")], lines.append, None)
    assert lines == [] and stats.filtered == 1
    dec.decode([_raw("kfunc:x", matched=0)], lines.append, None)
    assert lines == [] and stats.filtered == 2
    dec.decode([_raw("kfunc:x")], lines.append, None)
    assert len(lines) == 1


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=8))
def test_decoder_never_raises_on_forged_records(raws: list[bytes]) -> None:
    dec, _stats = _decoder("module.load")
    dec.decode(raws, lambda _line: None, lambda _ev: None)


def test_ring_sizes() -> None:
    from vmshield.cli.checks import ring_size
    from vmshield.errors import VmshieldError
    from vmshield.space.region import ring_size_for

    assert ring_size_for(512 << 20, 1) == 16 << 20
    assert ring_size_for(512 << 20, 4) == 4 << 20
    assert ring_size_for(64 << 20, 8) == 256 << 10
    assert ring_size_for(16 << 20, 8) == ring_size_for(8 << 20, 8) == L.RING_MIN
    assert ring_size_for(64 << 30, 1) == 16 << 20
    assert ring_size("8M") == ring_size("8MiB") == 8 << 20
    assert ring_size("256k") == ring_size("262144") == 256 << 10
    for bad in ("3M", "1K", "1G", "-8M", "abc", "", "9" * 20):
        try:
            ring_size(bad)
        except VmshieldError as e:
            assert "--ring-size" in str(e)
        else:
            raise AssertionError(bad)


def test_aggregate_summaries_from_the_guest_tables() -> None:
    """--aggregate: the host reads the tables the agent fills (counts that only grow),
    emits the increase per task once per interval, and a count that goes back is a
    ring-state alert, not a negative count."""
    import ctypes as C

    from vmshield.monitor.space_engine import SpaceEngine

    r = Ring()
    eng: Any = SpaceEngine.__new__(SpaceEngine)
    got: list[Event] = []
    eng.emit, eng.emit_json, eng.stats, eng._agg_last = got.append, None, SpaceStats(), {}
    eng.t = SimpleNamespace(name="lab")
    eng.wants_lines = lambda: False
    eng.space = SimpleNamespace(rings=r.reader, region=SimpleNamespace(ncpus=1))
    dec, _ = _decoder("kfunc:__x64_sys_getpid")
    eng.sites = dec.sites
    table = L.agg_offset(RING)

    def slot(i: int, count: int, pid: int = 42) -> None:
        s = L.AggSlot()
        s.count, s.pid, s.tgid, s.site, s.comm = count, pid, pid, 0, b"vmstest"
        at = table + i * C.sizeof(L.AggSlot)
        r.buf[at : at + C.sizeof(s)] = bytes(s)

    slot(3, 1000)
    slot(7, 5, pid=43)
    eng._aggregate_once(1.0)
    (ev,) = got
    assert ev.object == "space.aggregate" and ev.fields["total"] == 1005
    assert [(c["pid"], c["count"]) for c in ev.fields["counts"]] == [(42, 1000), (43, 5)]
    slot(3, 1500)
    eng._aggregate_once(1.0)
    assert got[-1].fields["counts"] == [{"object": "kfunc:__x64_sys_getpid", "pid": 42,
                                         "tgid": 42, "uid": 0, "comm": "vmstest", "key": "",
                                         "count": 500}]  # fmt: skip
    n = len(got)
    eng._aggregate_once(1.0)  # nothing new: no event
    assert len(got) == n
    slot(3, 10)  # forged backwards
    eng._aggregate_once(1.0)
    assert len(got) == n
    assert any("aggregation slot 3" in a.where for a in r.reader.take_findings())
    # two keys the guest cut to the same start stay two lines, told apart by their hash
    for i, h in ((9, 0xA1), (10, 0xB2)):
        s = L.AggSlot()
        s.count, s.pid, s.tgid, s.site, s.comm, s.key = 7, 44, 44, 0, b"vmstest", h
        s.ktext[:], s.klen = b"/x" * 24, 400
        at = table + i * C.sizeof(L.AggSlot)
        r.buf[at : at + C.sizeof(s)] = bytes(s)
    eng._aggregate_once(1.0)
    cut = [c for c in got[-1].fields["counts"] if c["pid"] == 44]
    assert sorted(c["key_hash"] for c in cut) == [f"{0xA1:#018x}", f"{0xB2:#018x}"]
    assert all(c["key"] == "/x" * 24 + "..." and c["count"] == 7 for c in cut)
    # the key's text: all of it, or its start and "..." (the hash keeps such keys apart)
    s = L.AggSlot()
    s.ktext[:6], s.klen = b"/tmp/a", 6
    assert _agg_key_text(s) == "/tmp/a"
    s.ktext[:], s.klen = b"/x" * 24, 400
    assert _agg_key_text(s) == "/x" * 24 + "..."
