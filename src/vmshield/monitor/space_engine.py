"""The security-space engine: switch gates in the guest, rings drained from shared RAM.

Per event there is no VM exit: the agent records into its CPU's ring, the host drains
the rings every ``DRAIN_INTERVAL`` and turns records into the same ``vmshield.event/1``
events the exit engine emits. ``deny`` and ``kill`` are decided in the guest, by rules
the host compiles from the requests (pid, uid, comm, path, port filters); ``pause`` and
``dump`` are carried out by the host when it drains the record. The gdbstub is used only
to build, re-arm and tear down; between those the VM has no debugger attached.

Integrity: every drain compares the agent code, config, patched sites and ftrace flags
with what was written, and every ``check_interval`` also the page-table entries and the
CPU control state the agent samples. A change is an ``space.integrity`` alert event; the
default policy re-arms (writes our bytes back), ``alert`` only reports.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmshield.errors import VmshieldError
from vmshield.guest.kernel import Kernel
from vmshield.hv.target import Target
from vmshield.monitor.actions import DumpPolicy, pause_vm, vm_status
from vmshield.monitor.dispatch import Hit, dispatch
from vmshield.monitor.engine import Stats
from vmshield.monitor.events import Event, PointInfo, ProcessContext
from vmshield.monitor.kinds import EngineKind
from vmshield.monitor.request import ResolvedRequest
from vmshield.space import captures
from vmshield.space import layout as L
from vmshield.space.alert import Alert
from vmshield.space.borrow import Borrow, borrowed
from vmshield.space.space import SecuritySpace, SpaceBusy, SpaceError

DRAIN_INTERVAL = 0.02
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
                return f"more than {L.MAX_RULES} deny/kill requests on {r.point.symbol}"
    if len({r.point.address for r in requests}) > L.MAX_SITES:
        return f"more than {L.MAX_SITES} monitoring points"
    return None


NUMERIC_LIMITS = {"pid": 1 << 31, "uid": 1 << 32, "port": 1 << 16}


def _rule_problem(filters: dict[str, str]) -> str | None:
    """Why the agent cannot decide these filters exactly as the exit engine would."""
    for key, val in filters.items():
        if key not in captures.AGENT_FILTERS:
            return f"the agent cannot evaluate filter {key!r} (it can: pid, uid, comm, path, port)"
        if key in NUMERIC_LIMITS:
            plain = val.isascii() and val.isdigit() and (val == "0" or not val.startswith("0"))
            if not plain or int(val) >= NUMERIC_LIMITS[key]:
                return f"filter {key}={val!r} must be a plain decimal number in range"
        if key in ("comm", "path") and any(ch in val for ch in "[]"):
            return f"filter {key}={val!r}: character classes are not evaluated in the guest"
        limit = L.COMM_LEN if key == "comm" else L.RULE_PATH_LEN
        if key in ("comm", "path") and len(val.encode()) >= limit:
            return f"filter {key}={val!r} is too long for the agent ({limit - 1} bytes)"
    return None


def _rule(action: str, filters: dict[str, str]) -> L.Rule:
    r = L.Rule()
    r.action = AGENT_ACTIONS[action]
    for key, val in filters.items():
        if key == "pid":
            r.has |= L.R_PID
            r.pid = int(val)
        elif key == "uid":
            r.has |= L.R_UID
            r.uid = int(val)
        elif key == "port":
            r.has |= L.R_PORT
            r.port = int(val)
        elif key == "comm":
            r.has |= L.R_COMM
            r.comm = val.encode()
        elif key == "path":
            r.has |= L.R_PATH
            r.path = val.encode()
    return r


@dataclass
class _Site:
    index: int
    plan: captures.Plan
    requests: list[ResolvedRequest]
    rule_of: dict[int, int] = field(default_factory=dict)  # request position -> rule bit


@dataclass
class SpaceStats(Stats):
    """The exit engine's counters (round trips stay 0: no exit per event), plus the
    space's own."""

    drops: int = 0
    alerts: int = 0
    drains: int = 0


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
        self.space: SecuritySpace | None = None
        self.sites: dict[int, _Site] = {}
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
                sp.build(b, len(b.stub.threads()))
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
            plan = captures.plan_for(reqs[0].request.object, self.k)
            site = _Site(idx, plan, reqs)
            s = sp.config.sites[idx]
            s.nfetch = len(plan.fetches)
            for j, f in enumerate(plan.fetches):
                s.fetch[j] = f
            s.path_item, s.port_item, s.port_mode = plan.path_item, plan.port_item, plan.port_mode
            for pos, r in enumerate(reqs):
                if r.request.action in AGENT_ACTIONS:
                    bit = s.nrules
                    s.rules[bit] = _rule(r.request.action, r.request.filters)
                    s.nrules += 1
                    site.rule_of[pos] = bit
            s.enabled = 1
            self.sites[idx] = site

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
        while not should_stop() and (end is None or time.monotonic() < end):
            if self.fallback_requested:
                return  # the caller moves the requests to the exit engine
            time.sleep(DRAIN_INTERVAL)
            # Draining and checking go on while the VM is paused (shared RAM needs no
            # running vCPU): records written before the pause are delivered, and the
            # monitor is there for the first event after the operator resumes.
            deep = time.monotonic() >= next_check
            if deep:
                next_check = time.monotonic() + self.check_interval
            self._drain_once()
            self._integrity(deep)

    def _drain_once(self) -> None:
        sp = self.space
        if sp is None:
            return
        self.stats.drains += 1
        for rec, data in sp.drain():
            self._handle(rec, data)
        counters = sp.counters()
        self.stats.hits = counters["hits"]
        # Drops as the host counted them per CPU (rings.py): a counter the guest resets
        # or saturates is an alert, and later drops are still reported.
        lost = sp.rings.take_dropped() if sp.rings else 0
        if lost:
            self._drops_seen = sp.rings.total_dropped if sp.rings else 0
            self.stats.drops = self._drops_seen
            self._system_event("space.ring", "drop", {"dropped": lost, "total": self._drops_seen})

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

    def _system_event(self, obj: str, action: str, fields: dict[str, Any]) -> None:
        self.emit(Event(
            time=time.time(), vm=self.t.name, request="space", object=obj, action=action,
            process=None, fields=fields,
            point=PointInfo(symbol=str(fields.get("where", obj)),
                            address=str(fields.get("address", "0x0")),
                            kind="security-space", engine="space", cpu=0),
        ))  # fmt: skip

    # -- records -> events ----------------------------------------------------------------

    def _handle(self, rec: L.Record, data: bytes) -> None:
        site = self.sites.get(rec.site)
        if site is None:
            return
        items = captures.parse_items(data, rec.nitems)
        cap = captures.Captured(list(rec.args), items)
        proc = ProcessContext(
            pid=rec.pid, tgid=rec.tgid, ppid=rec.ppid, uid=rec.uid, euid=rec.euid,
            gid=rec.gid, comm=rec.comm.decode(errors="backslashreplace"),
            task=f"{rec.task:#x}",
        )  # fmt: skip

        def point(r: ResolvedRequest) -> PointInfo:
            return PointInfo(symbol=r.point.symbol, address=f"{r.point.address:#x}",
                             kind="kernel-function", engine="space", cpu=rec.cpu)  # fmt: skip

        hit = Hit(
            vm=self.t.name, time=self.space.host_time(rec.ns) if self.space else time.time(),
            process=proc, decode=lambda r: site.plan.decode(cap), act=self._act, point=point,
            errors=cap.errors,
            decided={pos: bool(rec.matched >> bit & 1) for pos, bit in site.rule_of.items()},
        )  # fmt: skip
        events: list[Event] = []
        if dispatch(hit, site.requests, self.stats, events.append) == "pause":
            pause_vm(self.t)
            self.paused = True
        for ev in events:  # after the pause: whoever reads the event finds the VM paused
            self.emit(ev)

    def _act(self, action: str, r: ResolvedRequest) -> dict[str, Any]:
        if action == "dump":
            return self.dumps.dump(self.t, r.request.id)
        if action == "pause":
            return {"paused": True}
        if action == "kill":  # done in the guest by the agent's rule
            return {"signal": "SIGKILL"}
        return {}
