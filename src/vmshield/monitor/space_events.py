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
  (:func:`vmshield.monitor.events.trusted_event`): every value comes from this decoder.

Requests with ``pause`` or ``dump`` take the general path (:func:`dispatch`), which
acts through the engine.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from vmshield.errors import VmshieldError
from vmshield.monitor.events import SCHEMA, Event, PointInfo, ProcessContext, trusted_event
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
    points: dict[int, tuple[str, PointInfo]] = field(default_factory=dict)  # cpu -> point


@dataclass
class SiteDecoder:
    """Everything the host needs to turn one site's records into events."""

    index: int
    plan: captures.Plan
    requests: list[SiteRequest]
    fast: bool  # no pause/dump request here: events need no host action
    raw_args: bool = False  # a kfunc: point: the fields are the argument registers


class Stats:
    """Counters shared with the engine (a :class:`SpaceStats` in practice)."""

    events: int
    filtered: int
    decode_errors: int
    by_object: dict[str, int]


def _json(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)


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
        self._raw_fields: dict[tuple[int, ...], tuple[list[str], str]] = {}
        vm_json = _json(vm)
        for site in sites.values():
            for sr in site.requests:
                r = sr.req.request
                sr.pre = (f',"vm":{vm_json},"request":{_json(r.id)},"object":{_json(r.object)}'
                          f',"action":{_json(sr.action)},"process":')  # fmt: skip
                sr.detail = {"signal": "SIGKILL"} if sr.action == "kill" else {}
                sr.object = r.object
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
        decode error, never raised."""
        stats = self.stats
        sites = self.sites
        hot = HOT.unpack_from
        procs = self._procs
        raw_cache = self._raw_fields
        host_time = self.host_time
        head = f'{{"schema":"{SCHEMA}","time":'
        n_events = n_filtered = n_errors = 0
        per_object: dict[str, int] = {}
        for raw in records:
            if len(raw) < L.RECORD_HEADER:
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
            end = L.RECORD_HEADER + 8 * nargs
            if nargs > 6 or end > len(raw):
                n_errors += 1
                continue
            args = ARGS[nargs].unpack_from(raw, L.RECORD_HEADER)
            who = raw[PSTART:PEND]
            proc_json, proc, proc_d = procs.get(who) or self.process(who)
            errors: list[str] = []
            fields: dict[str, Any] | None = None
            fields_json = ""
            for sr in site.requests:
                if not matched >> sr.bit & 1:
                    n_filtered += 1
                    continue
                if fields is None:
                    if site.raw_args:  # kfunc: the six argument registers, nothing else
                        # The same registers come back again and again (a syscall's
                        # pt_regs pointer): their text is cached.
                        got = raw_cache.get(args)
                        if got is None:
                            if len(raw_cache) >= PROCESS_CACHE:
                                raw_cache.clear()
                            hexes = [hex(a) for a in args + (0,) * (6 - nargs)]
                            got = raw_cache[args] = (
                                hexes,
                                '{"args":["' + '","'.join(hexes) + '"]}',
                            )
                        fields = {"args": got[0]}  # copied below before it leaves here
                        fields_json = got[1]
                    else:
                        items = captures.parse_items(raw[end:], nitems)
                        cap = captures.Captured(list(args) + [0] * (6 - nargs), items)
                        try:
                            fields = site.plan.decode(cap)
                        except VmshieldError as e:
                            cap.errors.append(f"decode: {e}")
                            fields = {}
                        errors = cap.errors
                        fields_json = orjson.dumps(fields).decode()
                if not sr.exact and not all(
                    match_filter(k, v, fields, proc_d) for k, v in sr.req.request.filters.items()
                ):
                    n_filtered += 1
                    continue
                n_events += 1
                obj = sr.object
                per_object[obj] = per_object.get(obj, 0) + 1
                if errors:
                    n_errors += 1
                t = host_time(ns)
                point_json, point = sr.points.get(cpu) or self.point(sr, cpu)
                if lines is not None:
                    lines(
                        f'{head}{t!r}{sr.pre}{proc_json},"fields":{fields_json},"point":'
                        f'{point_json},"decode_errors":'
                        f'{orjson.dumps(errors).decode() if errors else "[]"},"detail":'
                        f"{sr.detail_json}}}"
                    )
                if events is not None:
                    mine = {"args": list(fields["args"])} if site.raw_args else fields
                    events(trusted_event(t, self.vm, sr.req.request.id, obj, sr.action, proc,
                                         mine, point, list(errors), dict(sr.detail)))  # fmt: skip
        stats.events += n_events
        stats.filtered += n_filtered
        stats.decode_errors += n_errors
        for obj, n in per_object.items():
            stats.by_object[obj] = stats.by_object.get(obj, 0) + n
