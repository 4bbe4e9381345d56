"""The security-space engine: switch gates in the guest, rings drained from shared RAM.

Per event there is no VM exit: the agent records into its CPU's ring, the host drains
the rings every ``DRAIN_INTERVAL`` at most (sooner as they fill: ``drain_interval``) and
turns records into the same ``vmshield.event/1`` events the exit engine emits, in
batches (:mod:`vmshield.monitor.space_events`). Every request is a rule in the guest: a
hit that no request wants is dropped there, before it takes ring space or host time.
The agent evaluates every filter of the request language exactly as the exit engine
does (:mod:`vmshield.space.rules`: ``pid``, ``uid``, and globs with classes on
``comm``, ``path``, ``address``, ``port``, ``escalation``, ``changed``); only a pattern
too long for a rule is checked on the host for the records the agent let through.
``deny`` and ``kill`` are decided in the guest; ``pause`` and ``dump`` are carried out
by the host when it drains the record. The gdbstub is used only to build, re-arm and
tear down; between those the VM has no debugger attached.

Integrity: every drain compares the agent code, config, patched sites and ftrace flags
with what was written, and every ``check_interval`` also the page-table entries and the
CPU control state the agent samples. A change is an ``space.integrity`` alert event; the
default policy re-arms (writes our bytes back), ``alert`` only reports.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmshield.errors import VmshieldError
from vmshield.guest.kernel import Kernel
from vmshield.hv.gdbstub import GdbStub
from vmshield.hv.target import Target
from vmshield.monitor import space_events
from vmshield.monitor.actions import DumpPolicy, pause_vm, vm_status
from vmshield.monitor.dispatch import Hit, dispatch
from vmshield.monitor.engine import Stats
from vmshield.monitor.events import Event, PointInfo
from vmshield.monitor.kinds import EngineKind
from vmshield.monitor.request import ResolvedRequest
from vmshield.objects.catalog import plan_for
from vmshield.space import captures, rules
from vmshield.space import layout as L
from vmshield.space.alert import Alert
from vmshield.space.borrow import Borrow, borrowed
from vmshield.space.errors import SpaceBusy, SpaceError
from vmshield.space.space import SecuritySpace

DRAIN_INTERVAL = 0.02  # at most; see drain_interval()
DRAIN_MIN = 0.001
AGENT_ACTIONS = {"deny": L.A_DENY, "kill": L.A_KILL}
POLICIES = ("rearm", "alert", "exit")


REPAIRABLE = frozenset({"agent-code", "config", "site", "kernel-table", "ftrace-flags"})
_RESPONSE = {"rearm": "rearm", "alert": "reported", "exit": "fallback to the exit engine"}


def unsupported(requests: list[ResolvedRequest]) -> str | None:
    """Why these requests cannot run in the security space (None: they can)."""
    per_site: dict[int, int] = {}
    for r in requests:
        name = r.request.object
        if not r.point.on_nop or not r.point.address >> 63:
            return f"{name} is a user-space point (the security space patches kernel sites)"
        if r.request.action in AGENT_ACTIONS:
            problem = _rule_problem(r.request.filters)
            if problem:
                return f"{name} with action {r.request.action}: {problem}"
        per_site[r.point.address] = per_site.get(r.point.address, 0) + 1
        if per_site[r.point.address] > L.MAX_RULES:
            return f"more than {L.MAX_RULES} requests on {r.point.symbol}"
    if len({r.point.address for r in requests}) > L.MAX_SITES:
        return f"more than {L.MAX_SITES} monitoring points"
    return None


def _rule_problem(filters: dict[str, str]) -> str | None:
    """Why the agent cannot decide these filters exactly as the exit engine would."""
    return rules.rule_problem(filters)


def _rule(action: str, filters: dict[str, str]) -> L.Rule:
    """The agent's rule for one request: every filter, evaluated in the guest
    (:mod:`vmshield.space.rules`); a pattern too long for the rule sets
    ``R_HOST`` (the host checks the records the rule lets through)."""
    return rules.rule_for(AGENT_ACTIONS.get(action, L.A_LOG), filters)


def _agg_key_text(slot: L.AggSlot) -> str:
    """An aggregation slot's key as text (its start and "..." when the guest kept only
    the first ``AGG_KEY_LEN`` bytes; slots with keys that share that start are told
    apart by the hash, which the summary then shows as ``key_hash``)."""
    n = min(int(slot.klen), L.AGG_KEY_LEN)
    text = bytes(slot.ktext[:n]).decode(errors="backslashreplace")
    return text + "..." if slot.klen > L.AGG_KEY_LEN else text


def drain_interval(fill: float) -> float:
    """Seconds until the next drain, from how full the fullest ring was (0..1): the
    full ``DRAIN_INTERVAL`` for a quiet guest, down to ``DRAIN_MIN`` once a ring is an
    eighth full (a burst: the host reads while the agent still writes)."""
    return max(DRAIN_MIN, DRAIN_INTERVAL * (1.0 - 8.0 * fill))


@dataclass
class SpaceStats(Stats):
    """The exit engine's counters (round trips stay 0: no exit per event), plus the
    space's own."""

    drops: int = 0
    alerts: int = 0
    drains: int = 0
    guest_filtered: int = 0  # hits no request wanted, dropped by the agent itself
    aggregated: int = 0  # hits counted in the guest's aggregation tables (--aggregate)


class SpaceEngine:
    kind = EngineKind.SPACE

    def __init__(
        self,
        target: Target,
        kernel: Kernel,
        requests: list[ResolvedRequest],
        emit: Callable[[Event], None],
        dump_dir: Path | None = None,
        check_interval: float = 1.0,
        policy: str = "rearm",
        dump_interval: float = 10.0,
        ring_size: int | None = None,
        emit_json: Callable[[str], None] | None = None,
        aggregate: float | None = None,
    ) -> None:
        if policy not in POLICIES:
            raise VmshieldError(f"unknown tamper policy {policy!r} (use {', '.join(POLICIES)})")
        self.t = target
        self.k = kernel
        self.requests = requests
        self.emit = emit
        self.dumps = DumpPolicy(dump_dir or Path.cwd(), dump_interval)
        self.check_interval = check_interval
        self.policy = policy
        self.ring_size = L.check_ring_size(ring_size) if ring_size else None
        # --aggregate: seconds between summaries (None: every hit is an event)
        self.aggregate = aggregate
        self.not_aggregated: list[str] = []  # requests that stay one event per hit, and why
        self._agg_last: dict[tuple[int, int], tuple[tuple[Any, ...], int]] = {}
        # JSON lines straight from records (the CLI's --json); Event objects only while
        # wants_events() says someone reads them.
        self.emit_json = emit_json
        self.wants_events: Callable[[], bool] = lambda: True
        self.wants_lines: Callable[[], bool] = lambda: True
        self.lines_done: Callable[[], None] = lambda: None  # after each batch of lines
        self.space: SecuritySpace | None = None
        self.sites: dict[int, space_events.SiteDecoder] = {}
        self.decoder: space_events.RecordDecoder | None = None
        self.stats = SpaceStats()
        self.paused = False
        self._drops_seen = 0
        # Policy "exit": the space was tampered with; run() returns so that the caller
        # can tear it down and carry on with breakpoint exits, out of the guest's reach.
        self.fallback_requested = False

    # -- arm / detach -------------------------------------------------------------------

    def arm(self) -> None:
        built = SecuritySpace.load_state(self.t, self.k)  # `vmshield space build`
        if built is not None and (other := built.in_use_by()):
            raise VmshieldError(
                f"{self.t.name}: the security space is in use by another monitor "
                f"(pid {other}); one space monitor per VM"
            )
        sp = built or SecuritySpace(self.t, self.k)
        sp.user_pid = os.getpid()
        # Afterwards the VM runs on with no debugger attached.
        with borrowed(self.t, self.k, "build" if built is None else "adopt") as b:
            if built is None:
                sp.build(b, len(b.stub.threads()), self.ring_size)
            else:
                sp.adopt(b)
            self.space = sp
            try:
                self._configure(sp)
                b.select()
                sp.patch(b.stub)
            except BaseException as e:
                try:
                    self._teardown(b)
                except VmshieldError as e2:
                    raise SpaceError(
                        f"{e}; and removing the half-built space failed ({e2}): "
                        f"run `vmshield detach {self.t.name}`"
                    ) from e
                raise

    def _teardown(self, b: Borrow) -> None:
        """Free a space this engine built; only unpatch one it adopted."""
        sp = self.space
        if sp is None:
            return
        if sp.owned:
            sp.destroy(b)
        else:
            inside = sp.inside(b.stub)
            if inside:
                raise SpaceBusy(f"refusing to detach: vCPU {inside[0][0]} is inside the space")
            b.select()
            sp.user_pid = None
            sp.clear_sites(b.stub)
        self.space = None

    def _configure(self, sp: SecuritySpace) -> None:
        by_addr: dict[int, list[ResolvedRequest]] = {}
        for r in self.requests:
            by_addr.setdefault(r.point.address, []).append(r)
        for addr, reqs in by_addr.items():
            idx = sp.add_site(reqs[0].point.symbol, addr)
            plan = plan_for(reqs[0].request.object, self.k)
            s = sp.config.sites[idx]
            captures.fill_site(s, plan)
            srs = []
            for pos, r in enumerate(reqs):  # unsupported() allows at most MAX_RULES
                rule = _rule(r.request.action, r.request.filters)
                s.rules[s.nrules] = rule
                srs.append(
                    space_events.SiteRequest(
                        pos, r, s.nrules, not rule.has & L.R_HOST, r.request.action
                    )
                )
                s.nrules += 1
            if self.aggregate:
                why = self._aggregate_problem(reqs, srs)
                if why:
                    self.not_aggregated.append(f"{reqs[0].point.symbol}: {why}")
                else:
                    s.aggregate = 1 + plan.agg_key
            s.enabled = 1
            fast = all(r.request.action in space_events.FAST_ACTIONS for r in reqs)
            self.sites[idx] = space_events.SiteDecoder(idx, plan, srs, fast)
        self.decoder = space_events.RecordDecoder(self.t.name, self.sites, sp.host_time,
                                                  self.stats, self._handle)  # fmt: skip

    @staticmethod
    def _aggregate_problem(
        reqs: list[ResolvedRequest], srs: list[space_events.SiteRequest]
    ) -> str | None:
        """Why the hits of a site cannot be counted in the guest instead of recorded."""
        for r, sr in zip(reqs, srs, strict=True):
            if r.request.action != "log":
                return f"{r.request.object} has action {r.request.action} (events kept)"
            if not sr.exact:
                return f"{r.request.object} has filters only the host can check (events kept)"
        return None

    def _aggregate_once(self, interval: float) -> None:
        """One summary event: the hits counted in the guest's tables since the last one,
        per (object, task, comm, key). Counts only grow; one that went back is a
        ring-state alert (the guest wrote the table), and the host starts over from it."""
        sp = self.space
        if sp is None or sp.rings is None or sp.region is None:
            return
        totals: dict[tuple[Any, ...], int] = {}
        for cpu in range(sp.region.ncpus):
            try:
                slots = sp.rings.aggregates(cpu)
            except VmshieldError as e:
                sp.rings.findings.append(Alert("ring-state", f"cpu {cpu} aggregation table", 0,
                                               "readable", f"unreadable: {e}"))  # fmt: skip
                continue
            for i, slot in slots:
                site = self.sites.get(int(slot.site))
                comm = bytes(slot.comm).decode(errors="backslashreplace")
                key = _agg_key_text(slot)
                ident = (int(slot.site), int(slot.pid), int(slot.tgid), int(slot.key), key, comm)
                count = int(slot.count)
                last = self._agg_last.get((cpu, i))
                base = last[1] if last is not None and last[0] == ident else 0
                self._agg_last[(cpu, i)] = (ident, count)
                if count < base:
                    sp.rings.findings.append(Alert(
                        "ring-state", f"cpu {cpu} aggregation slot {i}", 0, f">= {base}",
                        f"{count} (went backwards)"))  # fmt: skip
                    continue
                if site is None or count == base:
                    continue
                obj = site.requests[0].req.request.object
                # A key the guest cut keeps its hash: keys sharing their first bytes
                # stay separate lines (slots of one key on several CPUs still merge).
                cut = int(slot.key) if slot.klen > L.AGG_KEY_LEN else None
                line = (obj, ident[1], ident[2], int(slot.uid), comm, key, cut)
                totals[line] = totals.get(line, 0) + count - base
        if not totals:
            return
        counts: list[dict[str, Any]] = []
        for (o, pid, tgid, uid, comm, k, cut), n in sorted(totals.items(), key=lambda x: -x[1]):
            c: dict[str, Any] = {"object": o, "pid": pid, "tgid": tgid, "uid": uid,
                                 "comm": comm, "key": k, "count": n}  # fmt: skip
            if cut is not None:
                c["key_hash"] = f"{cut:#018x}"
            counts.append(c)
        self.stats.aggregated += sum(totals.values())
        self._system_event("space.aggregate", "log", {
            "interval": round(interval, 3), "total": sum(totals.values()), "counts": counts,
            "where": "aggregation tables"})  # fmt: skip

    def detach(self, attempts: int = 5) -> None:
        """Unpatch, free and leave no trace; refused while a vCPU is inside the space
        (retried a few times: a vCPU leaves the agent within microseconds)."""
        sp = self.space
        if sp is None:
            return
        # Teardown borrows a vCPU and so runs the VM for a moment; a VM our pause
        # action left paused is paused again afterwards (the pause is the operator's).
        keep_paused = self._still_paused()
        try:
            self._detach(sp, attempts)
        finally:
            if keep_paused:
                pause_vm(self.t)

    def _detach(self, sp: SecuritySpace, attempts: int) -> None:
        last: SpaceBusy | None = None
        for _ in range(attempts):
            self._drain_once()
            try:
                with borrowed(self.t, self.k, "teardown") as b:
                    self._drain_once()  # the VM is stopped: these are the last records
                    if self.aggregate:
                        self._aggregate_once(self.aggregate)
                    self._teardown(b)
                for sym in sp.left_disabled:
                    self._system_event("space.detach", "note", {
                        "where": sym, "what": "ftrace-flags",
                        "found": "guest ftrace users were active: FTRACE_FL_DISABLED left "
                                 "set (clearing it would unbalance their use counts)"})  # fmt: skip
                for why in sp.forged_inflight:
                    self._system_event("space.integrity", "alert", {
                        "what": "ring-state", "where": why,
                        "found": "in-flight flag set with no vCPU in the agent"})  # fmt: skip
                return
            except SpaceBusy as e:  # borrowed() let the VM run on
                last = e
                time.sleep(0.05)
        raise SpaceBusy(f"{last}")

    # -- the loop -----------------------------------------------------------------------

    def run(self, duration: float | None, should_stop: Callable[[], bool]) -> None:
        end = time.monotonic() + duration if duration else None
        next_check = time.monotonic() + self.check_interval
        wait = DRAIN_INTERVAL
        last_agg = last_check = time.monotonic()
        while not should_stop() and (end is None or time.monotonic() < end):
            if self.fallback_requested:
                return  # the caller moves the requests to the exit engine
            time.sleep(wait)
            # Draining and checking go on while the VM is paused (shared RAM needs no
            # running vCPU): records written before the pause are delivered, and the
            # monitor is there for the first event after the operator resumes.
            deep = time.monotonic() >= next_check
            if deep:
                next_check = time.monotonic() + self.check_interval
            wait = drain_interval(self._drain_once())
            if self.aggregate and time.monotonic() - last_agg >= self.aggregate:
                now = time.monotonic()
                self._aggregate_once(now - last_agg)
                last_agg = now
            # The content checks (hashes of code and config, sites, flags) keep their
            # DRAIN_INTERVAL pace when a burst makes the drains come faster.
            if self.periodic is not None:  # requested integrity objects first
                self.periodic(self._quiesced)
            if deep or time.monotonic() - last_check >= DRAIN_INTERVAL:
                last_check = time.monotonic()
                self._integrity(deep)

    periodic: Callable[[Callable[[Callable[[GdbStub], None]], None]], None] | None = None
    """Called from the loop with a way to stop every vCPU (the integrity checker)."""

    def _quiesced(self, fn: Callable[[GdbStub], None]) -> None:
        """Run ``fn`` with a gdbstub, every vCPU stopped (connecting stops them; the
        detach resumes). The space holds no gdbstub between its own borrows."""
        stub = self.t.gdbstub()
        try:
            fn(stub)
            stub.detach()
        finally:
            stub.close()

    def _drain_once(self) -> float:
        """Drain every ring once; returns how full the fullest ring was (0..1)."""
        sp = self.space
        if sp is None or self.decoder is None:
            return 0.0
        self.stats.drains += 1
        fill = 0.0
        if sp.rings is not None and sp.region is not None:
            try:
                fill = max(sp.rings.fill(cpu) for cpu in range(sp.region.ncpus))
            except VmshieldError:
                fill = 0.0  # unreadable: drain() says so as an alert
        records = list(sp.drain())
        events = self.emit if self.wants_events() else None
        lines = self.emit_json if self.emit_json is not None and self.wants_lines() else None
        self.decoder.decode(records, lines, events)
        counters = sp.counters()
        self.stats.hits = counters["hits"]
        self.stats.guest_filtered = counters["filtered"]
        # Drops as the host counted them per CPU (rings.py): a counter the guest resets
        # or saturates is an alert, and later drops are still reported.
        lost = sp.rings.take_dropped() if sp.rings else 0
        if lost:
            self._drops_seen = sp.rings.total_dropped if sp.rings else 0
            self.stats.drops = self._drops_seen
            r = sp.region
            ring = r.ring_size if r else 0
            self._system_event("space.ring", "drop", {
                "dropped": lost, "total": self._drops_seen, "ring_size": ring,
                "avoid": f"the {ring >> 10} KiB ring of a vCPU filled before the host read it: "
                         f"give --ring-size {min(L.RING_MAX, ring * 4) >> 20 or 1}M "
                         "(vmshield.Monitor(ring_size=...)), narrower filters, or --aggregate "
                         "for a high-frequency point (counts instead of every call)"})  # fmt: skip
        if records or lost:
            self.lines_done()
        return fill

    def _integrity(self, deep: bool) -> None:
        sp = self.space
        if sp is None:
            return
        alerts = sp.check(deep)
        if not alerts:
            return
        # Repair first, so that each alert says what really happened: "rearm" only for
        # what was put back (a page-table repair is verified by a fresh walk).
        repaired: list[Alert] = []
        if self.policy == "rearm":
            # Only what can be put back stops the VM for a borrowed call (a forged
            # counter, say, has nothing to put back: the host re-based on it).
            fixable = [a for a in alerts if a.fix or a.what in REPAIRABLE]
            repaired = self._rearm(fixable)
        elif self.policy == "exit" and any(a.what != "cpu-state" for a in alerts):
            self.fallback_requested = True
        for a in alerts:
            self.stats.alerts += 1
            if self.policy == "rearm":
                response = "rearm" if any(a is d for d in repaired) else "reported"
            else:
                response = _RESPONSE[self.policy] if a.what != "cpu-state" else "reported"
            self._system_event(
                "space.integrity", "alert",
                {"what": a.what, "where": a.where, "address": f"{a.address:#x}",
                 "expected": a.expected, "found": a.found, "response": response},
            )  # fmt: skip

    def _still_paused(self) -> bool:
        """True while a pause this engine made is in force. Repairs borrow a vCPU, which
        runs the VM, so they wait for the operator's resume (the alert is already out;
        the check repeats the finding every interval until then)."""
        if self.paused:
            self.paused = vm_status(self.t) != "running"
        return self.paused

    def _rearm(self, alerts: list[Alert]) -> list[Alert]:
        sp = self.space
        if not alerts or sp is None or self._still_paused():
            return []
        with borrowed(self.t, self.k, "rearm") as b:
            b.select()
            done = sp.repair(b, alerts)
            sp.sync_time(b)
        return done

    def _out(self, ev: Event) -> None:
        """An event made as an object: to ``emit``, and as a line to ``emit_json``."""
        self.emit(ev)
        if self.emit_json is not None and self.wants_lines():
            self.emit_json(ev.to_json())
            self.lines_done()

    def _system_event(self, obj: str, action: str, fields: dict[str, Any]) -> None:
        self._out(Event(
            time=time.time(), vm=self.t.name, request="space", object=obj, action=action,
            process=None, fields=fields,
            point=PointInfo(symbol=str(fields.get("where", obj)),
                            address=str(fields.get("address", "0x0")),
                            kind="security-space", engine="space", cpu=0),
        ))  # fmt: skip

    # -- records -> events ----------------------------------------------------------------

    def _handle(self, site: space_events.SiteDecoder, raw: bytes) -> None:
        """The general path, for a site with pause or dump requests: one record through
        :func:`dispatch`, which acts through this engine."""
        assert self.decoder is not None
        _site, cpu, nitems, nargs, _verdict, ns, matched = space_events.HOT.unpack_from(raw, 8)
        nargs = min(nargs, 6, (len(raw) - L.RECORD_HEADER) // 8)  # the decoder checked len
        args = list(space_events.ARGS[nargs].unpack_from(raw, L.RECORD_HEADER))
        items = captures.parse_items(raw[L.RECORD_HEADER + 8 * nargs :], nitems)
        cap = captures.Captured(args + [0] * (6 - nargs), items)
        _proc_json, proc, _d = self.decoder.process(raw[space_events.PSTART : space_events.PEND])
        by_pos = {sr.pos: sr for sr in site.requests}

        def point(r: ResolvedRequest) -> PointInfo:
            sr = next(x for x in site.requests if x.req is r)
            return self.decoder.point(sr, cpu)[1] if self.decoder else PointInfo(
                symbol=r.point.symbol, address=f"{r.point.address:#x}",
                kind="kernel-function", engine="space", cpu=cpu)  # fmt: skip

        hit = Hit(
            vm=self.t.name, time=self.space.host_time(ns) if self.space else time.time(),
            process=proc, decode=lambda r: site.plan.decode(cap), act=self._act, point=point,
            errors=cap.errors,
            decided={pos: bool(matched >> sr.bit & 1) for pos, sr in by_pos.items()
                     if sr.exact or not matched >> sr.bit & 1},
        )  # fmt: skip
        events: list[Event] = []
        if dispatch(hit, [sr.req for sr in site.requests], self.stats, events.append) == "pause":
            pause_vm(self.t)
            self.paused = True
        for ev in events:  # after the pause: whoever reads the event finds the VM paused
            self._out(ev)

    def _act(self, action: str, r: ResolvedRequest) -> dict[str, Any]:
        if action == "dump":
            return self.dumps.dump(self.t, r.request.id)
        if action == "pause":
            return {"paused": True}
        if action == "kill":  # done in the guest by the agent's rule
            return {"signal": "SIGKILL"}
        return {}
