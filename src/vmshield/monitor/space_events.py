"""Records to events in batches: the security space's hot path (issue 12).

The agent can publish a few hundred thousand records a second in a burst; the host must
turn them into ``vmshield.event/1`` at that rate on one core. Profiling the first
version (a pydantic model validated per event, three per record; a ctypes structure per
record; closures and filter dictionaries per hit) put it at 12,000 events/s on a loaded
machine, with validation and model construction the largest cost. Here:

- a record header is one ``struct.unpack_from`` (no ctypes object);
- the process part of an event (same task, same credentials, same name) is cached, as
  its JSON text and its :class:`ProcessContext`; the point is cached per request and CPU;
- a request the agent decided exactly (every filter evaluated in the guest) is not
  filtered again; only the filters the agent cannot decide (``R_HOST``) are checked here;
- JSON lines are produced directly, with the same keys in the same order as
  :meth:`Event.to_json` (orjson for the fields; tested against it), and
  :class:`Event` objects are made only when someone reads them, without validation
  (:func:`vmshield.monitor.events.trusted_maker`): every value comes from this decoder.

Requests with ``pause`` or ``dump`` take the general path (:func:`dispatch`), which
acts through the engine.
"""

from __future__ import annotations

import gc
import json
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from vmshield.errors import VmshieldError
from vmshield.monitor.events import (
    SCHEMA,
    Event,
    PointInfo,
    ProcessContext,
    TrustedMaker,
    trusted_maker,
)
from vmshield.monitor.request import ResolvedRequest
from vmshield.objects.filters import match_filter
from vmshield.space import captures
from vmshield.space import layout as L

# site, cpu, nitems, nargs, verdict, ns, matched: what the hot path reads of a header
# (from offset 8); WHO: pid, tgid, ppid, uid, euid, gid, task, comm. Both formats come
# from layout.Record.
_HOT, _HOT_AT = L.struct_format(L.Record, "site", "matched")
HOT = struct.Struct(_HOT)
assert _HOT_AT == 8
PSTART, PEND = L.PROCESS_BYTES
_WHO, _WHO_AT = L.struct_format(L.Record, "pid", "comm")
WHO = struct.Struct(_WHO)
assert _WHO_AT == PSTART and WHO.size == PEND - PSTART
ARGS = [struct.Struct(f"<{n}Q") for n in range(7)]
PROCESS_CACHE = 4096
FAST_ACTIONS = frozenset({"log", "deny", "kill"})
RANK = {"log": 0, "dump": 1, "pause": 2, "kill": 3, "deny": 4}


@dataclass
class SiteRequest:
    """One request at a site: its rule bit in the agent and whether the agent's answer is
    final (``exact``: every filter of the request was evaluated in the guest)."""

    pos: int
    req: ResolvedRequest
    bit: int
    exact: bool
    action: str
    pre: str = ""  # the JSON line up to the process, after "time"
    detail: dict[str, Any] = field(default_factory=dict)  # kill: the signal the agent sent
    detail_json: str = "{}"
    object: str = ""
    req_id: str = ""
    points: dict[int, tuple[str, PointInfo]] = field(default_factory=dict)  # cpu -> point
    tails: dict[int, str] = field(default_factory=dict)  # cpu -> the line after "fields"
    makers: dict[int, TrustedMaker] = field(default_factory=dict)  # cpu -> Event maker
    count: int = 0  # events in the batch being decoded


@dataclass
class SiteDecoder:
    """Everything the host needs to turn one site's records into events."""

    index: int
    plan: captures.Plan
    requests: list[SiteRequest]
    fast: bool  # no pause/dump request here: events need no host action
    # A kfunc: point: the fields are the argument registers. The plan's, copied into a
    # plain attribute because the hot path reads it for every record.
    raw_args: bool = field(init=False)

    def __post_init__(self) -> None:
        self.raw_args = self.plan.raw_args


class Stats:
    """Counters shared with the engine (a :class:`SpaceStats` in practice)."""

    events: int
    filtered: int
    decode_errors: int
    by_object: dict[str, int]


def _json(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)


ARGS_JSON = '{"args":["' + '","'.join(["%#x"] * 6) + '"]}'  # hex() of each register
ZEROS = [(0,) * (6 - n) for n in range(7)]
NO_ERRORS: list[str] = []  # never appended to: a record's own errors are a new list


class RecordDecoder:
    """Turns batches of raw records into events (see the module docstring).

    ``vm``: the VM's name in events; ``host_time``: guest monotonic ns to host time;
    ``slow``: the general path for a record whose site has pause/dump requests (it gets
    the record's bytes and returns nothing: the engine emits).
    """

    def __init__(
        self, vm: str, sites: dict[int, SiteDecoder], host_time: Callable[[int], float],
        stats: Any, slow: Callable[[SiteDecoder, bytes], None],
    ) -> None:  # fmt: skip
        self.vm = vm
        self.sites = sites
        self.host_time = host_time
        self.stats = stats
        self.slow = slow
        self._procs: dict[bytes, tuple[str, ProcessContext, dict[str, Any]]] = {}
        vm_json = _json(vm)
        for site in sites.values():
            for sr in site.requests:
                r = sr.req.request
                sr.pre = (f',"vm":{vm_json},"request":{_json(r.id)},"object":{_json(r.object)}'
                          f',"action":{_json(sr.action)},"process":')  # fmt: skip
                sr.detail = {"signal": "SIGKILL"} if sr.action == "kill" else {}
                sr.object = r.object
                sr.req_id = r.id
                sr.detail_json = orjson.dumps(sr.detail).decode()

    def point(self, sr: SiteRequest, cpu: int) -> tuple[str, PointInfo]:
        got = sr.points.get(cpu)
        if got is None:
            p = sr.req.point
            info = PointInfo.model_construct(
                symbol=p.symbol, address=f"{p.address:#x}", kind="kernel-function",
                engine="space", cpu=cpu,
            )  # fmt: skip
            got = sr.points[cpu] = (info.model_dump_json(), info)
            sr.tails[cpu] = (f',"point":{got[0]},"decode_errors":[],"detail":'
                             f"{sr.detail_json}}}")  # fmt: skip
        return got

    def maker(self, sr: SiteRequest, cpu: int) -> TrustedMaker:
        """The maker of this request's events on this CPU (see :func:`trusted_maker`)."""
        got = sr.makers.get(cpu)
        if got is None:
            got = sr.makers[cpu] = trusted_maker(self.vm, sr.req_id, sr.object, sr.action,
                                                 self.point(sr, cpu)[1])  # fmt: skip
        return got

    def tail(self, sr: SiteRequest, cpu: int) -> str:
        """The end of a JSON line after ``fields`` (point, no decode errors, detail):
        the same for every event of one request on one CPU."""
        got = sr.tails.get(cpu)
        if got is None:
            self.point(sr, cpu)
            got = sr.tails[cpu]
        return got

    def process(self, who: bytes) -> tuple[str, ProcessContext, dict[str, Any]]:
        """The process part of a record (its ``who`` bytes), cached: a burst comes from
        few tasks."""
        got = self._procs.get(who)
        if got is None:
            if len(self._procs) >= PROCESS_CACHE:
                self._procs.clear()
            pid, tgid, ppid, uid, euid, gid, task, comm = WHO.unpack(who)
            d = {"pid": pid, "tgid": tgid, "ppid": ppid, "uid": uid, "euid": euid,
                 "gid": gid, "comm": comm.split(b"\0", 1)[0].decode(errors="backslashreplace"),
                 "task": f"{task:#x}"}  # fmt: skip
            got = (orjson.dumps(d).decode(), ProcessContext.model_construct(**d), d)
            self._procs[who] = got
        return got

    def decode(
        self, records: list[bytes], lines: Callable[[str], None] | None,
        events: Callable[[Event], None] | None,
    ) -> None:  # fmt: skip
        """Every record of ``records`` to JSON lines (``lines``) and/or :class:`Event`
        objects (``events``); a record the guest forged into nonsense is counted as a
        decode error, never raised.

        Profiled per record (issue 12), the loop does only: one header unpack, a site
        lookup, the process from its cache by its bytes, the fields (for a ``kfunc:``
        point, the registers' text formatted in one operation, reused while the
        registers repeat, as a syscall's do), and one string join per JSON line from
        parts cached per request and CPU. Counters are summed once per batch.

        While :class:`Event` objects are made, the cyclic garbage collector waits until
        the batch is done: the batch makes no reference cycles, and with the readers'
        queues holding many events the collector's repeated passes over them cost more
        than decoding (measured: three times the batch's time)."""
        pause = events is not None and gc.isenabled()
        if pause:
            gc.disable()
        try:
            self._decode(records, lines, events)
        finally:
            if pause:
                gc.enable()

    def _decode(
        self, records: list[bytes], lines: Callable[[str], None] | None,
        events: Callable[[Event], None] | None,
    ) -> None:  # fmt: skip
        stats = self.stats
        sites = self.sites
        hot = HOT.unpack_from
        procs = self._procs
        host_time = self.host_time
        head = f'{{"schema":"{SCHEMA}","time":'
        n_filtered = n_errors = 0
        hdr = L.RECORD_HEADER
        last_regs: bytes | None = None  # the kfunc registers of the last record, and their text
        regs_json = ""
        regs: tuple[int, ...] = ()
        regs_hex: list[str] = []
        for raw in records:
            if len(raw) < hdr:
                n_errors += 1
                continue
            site_i, cpu, nitems, nargs, _verdict, ns, matched = hot(raw, 8)
            site = sites.get(site_i)
            if site is None:
                n_filtered += 1
                continue
            if not site.fast:
                self.slow(site, raw)
                continue
            end = hdr + 8 * nargs
            if nargs > 6 or end > len(raw):
                n_errors += 1
                continue
            who = raw[PSTART:PEND]
            proc_json, proc, proc_d = procs.get(who) or self.process(who)
            errors = NO_ERRORS
            fields: dict[str, Any] | None = None
            if site.raw_args:  # kfunc: the six argument registers, nothing else
                r = raw[hdr:end]
                if r != last_regs:
                    regs = ARGS[nargs].unpack_from(raw, hdr) + ZEROS[nargs]
                    regs_json = ARGS_JSON % regs
                    regs_hex = [hex(a) for a in regs] if events is not None else []
                    last_regs = r
                fields_json = regs_json
            else:
                args = ARGS[nargs].unpack_from(raw, hdr)
                items = captures.parse_items(raw[end:], nitems)
                cap = captures.Captured(list(args) + [0] * (6 - nargs), items)
                try:
                    fields = site.plan.decode(cap)
                except VmshieldError as e:
                    cap.errors.append(f"decode: {e}")
                    fields = {}
                errors = cap.errors
                fields_json = orjson.dumps(fields).decode()
            t = host_time(ns)
            for sr in site.requests:
                if not matched >> sr.bit & 1:
                    n_filtered += 1
                    continue
                if not sr.exact:
                    if fields is None:
                        fields = {"args": [hex(a) for a in regs]}
                    if not all(match_filter(k, v, fields, proc_d)
                               for k, v in sr.req.request.filters.items()):  # fmt: skip
                        n_filtered += 1
                        continue
                sr.count += 1
                if errors:
                    n_errors += 1
                if lines is not None:
                    if errors:
                        lines(
                            f'{head}{t!r}{sr.pre}{proc_json},"fields":{fields_json},'
                            f'"point":{self.point(sr, cpu)[0]},"decode_errors":'
                            f'{orjson.dumps(errors).decode()},"detail":{sr.detail_json}}}'
                        )
                    else:
                        lines(
                            f'{head}{t!r}{sr.pre}{proc_json},"fields":{fields_json}'
                            f"{sr.tails.get(cpu) or self.tail(sr, cpu)}"
                        )
                if events is not None:
                    # Each event its own containers: a reader may change what it got.
                    mine = {"args": regs_hex[:]} if site.raw_args else fields or {}
                    make = sr.makers.get(cpu) or self.maker(sr, cpu)
                    events(
                        make(
                            t,
                            proc,
                            mine,
                            errors[:] if errors else [],
                            dict(sr.detail) if sr.detail else {},
                        )
                    )
        n_events = 0
        by_object = stats.by_object
        for site in sites.values():
            for sr in site.requests:
                if sr.count:
                    n_events += sr.count
                    by_object[sr.object] = by_object.get(sr.object, 0) + sr.count
                    sr.count = 0
        stats.events += n_events
        stats.filtered += n_filtered
        stats.decode_errors += n_errors
