"""The VMs of this host and their monitors, kept in step with the store.

Why one monitor per VM holding every request: QEMU serves one gdbstub client per VM, so
adding or removing a request stops the VM's monitor (every point removed, every byte
restored) and starts a new one with the whole set. The store is the truth: at start
every request stored for this host is armed again (after a crash the new monitor adopts
what the dead one left, see :mod:`vmshield.monitor.session`).

Events are stored from the monitor's thread before anything else sees them; clients
only ever read them back from the store (queries and the SSE stream alike).
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from vmshield.errors import VmshieldError
from vmshield.guest.vm import VM, open_vm
from vmshield.hv.qmp import socket_peer_pid
from vmshield.monitor.events import Event
from vmshield.monitor.kinds import EngineKind
from vmshield.monitor.request import IsolationRequest
from vmshield.monitor.session import Monitor
from vmshield.store import Principal, Store

MAX_REQUESTS_PER_VM = 32
MAX_QUEUED = 200_000  # events waiting for the store writer
BATCH = 1000  # events per store transaction at most
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Problem(VmshieldError):
    """An API-level failure with the HTTP status it maps to (RFC 9457 at the edge)."""

    def __init__(self, status: int, title: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.title, self.detail = status, title, detail


def not_found(what: str) -> Problem:
    return Problem(404, "Not Found", what)


@dataclass
class Slot:
    """One VM of this host: its attachment, its monitor and what went wrong last."""

    id: str
    name: str
    target: str
    tenant: str
    vm: VM | None = None
    monitor: Monitor | None = None
    error: str | None = None
    kernel: str | None = None
    lock: threading.RLock = field(default_factory=threading.RLock)


@dataclass
class Metrics:
    """What /metrics shows for this daemon's VMs (counters since start)."""

    events: Counter[tuple[str, str]] = field(default_factory=Counter)
    alerts: Counter[str] = field(default_factory=Counter)
    latency: Histogram = field(default_factory=lambda: Histogram())  # event time -> stored
    added: Histogram = field(default_factory=lambda: Histogram())  # engine -> stored
    lock: threading.Lock = field(default_factory=threading.Lock)

    def observe(self, vm: str, obj: str, latency: float, added: float) -> None:
        with self.lock:
            self.events[(vm, obj)] += 1
            if obj == "space.integrity":
                self.alerts[vm] += 1
            self.latency.observe(latency)
            self.added.observe(added)


@dataclass
class Histogram:
    """Cumulative buckets in seconds, as Prometheus histograms count them."""

    buckets: list[int] = field(default_factory=lambda: [0] * len(LATENCY_BUCKETS))
    total: float = 0.0
    count: int = 0

    def observe(self, x: float) -> None:
        self.total += x
        self.count += 1
        for i, edge in enumerate(LATENCY_BUCKETS):
            if x <= edge:
                self.buckets[i] += 1


# vm, tenant, request, object, time, json, received_at
Row = tuple[str, str, str, str, float, str, float]


class Writer(threading.Thread):
    """Stores events in batches, one transaction per batch, then wakes the streams.

    Why a thread: a monitor thread that committed each event itself would stall its
    engine (the security space's rings would fill) on the store's commit latency.
    Events wait here at most until the current batch is committed; clients read only
    what is committed, so an event is stored before any client sees it. A full queue
    is a counted drop (``drops.queue``), never a blocked engine.
    """

    def __init__(self, store: Store, metrics: Metrics, notify: Callable[[], None]) -> None:
        super().__init__(name="vmshield-store-writer", daemon=True)
        self.store, self.metrics, self.notify = store, metrics, notify
        self.q: queue.Queue[Row | None] = queue.Queue(MAX_QUEUED)
        self.error: str | None = None

    def put(self, row: Row) -> bool:
        try:
            self.q.put_nowait(row)
            return True
        except queue.Full:
            return False

    def run(self) -> None:
        done = False
        while not done:
            item = self.q.get()
            batch: list[Row] = []
            while item is not None:
                batch.append(item)
                if len(batch) >= BATCH:
                    break
                try:
                    item = self.q.get_nowait()
                except queue.Empty:
                    break
            done = item is None
            if batch:
                self._write(batch)

    def _write(self, batch: list[Row]) -> None:
        for attempt in range(3):
            try:
                stored = self.store.add_events(batch)
                break
            except Exception as e:  # the store is down: retried, then counted as drops
                self.error = f"store: {e}"
                time.sleep(0.2 * (attempt + 1))
        else:
            per_vm = Counter(r[0] for r in batch)
            for vm, n in per_vm.items():
                with contextlib.suppress(Exception):
                    self.store.count(vm, "drops.store", n)
            return
        self.error = None
        for vm, _tenant, _req, obj, when, _text, got in batch:
            self.metrics.observe(vm, obj, max(0.0, stored - when), max(0.0, stored - got))
        self.notify()

    def close(self) -> None:
        """Store what is queued, then end."""
        self.q.put(None)
        self.join(60)


class Registry:
    """The VMs registered on ``host`` and their monitors."""

    def __init__(
        self,
        store: Store,
        host: str,
        state_dir: Path,
        *,
        notify: Callable[[], None] = lambda: None,
        engine: EngineKind | str = EngineKind.AUTO,
    ) -> None:
        self.store = store
        self.host = host
        self.state_dir = state_dir
        self.notify = notify
        self.engine = engine
        self.slots: dict[str, Slot] = {}
        self.metrics = Metrics()
        self.writer = Writer(store, self.metrics, notify)
        self.writer.start()
        self._lock = threading.Lock()

    # -- lifetime -----------------------------------------------------------------------

    def start(self) -> None:
        """Attach to every VM stored for this host and arm its stored requests."""
        for row in self.store.vms(host=self.host):
            slot = Slot(row["id"], row["name"], row["target"], row["tenant"])
            with self._lock:
                self.slots[slot.id] = slot
            if self._attach(slot):
                self._recover(slot)
            self.rearm(slot)

    def close(self) -> None:
        """Stop every monitor (detached: points removed, bytes restored) and let go of
        every VM."""
        with self._lock:
            slots = list(self.slots.values())
        for slot in slots:
            with slot.lock:
                self._stop(slot)
                if slot.vm is not None:
                    slot.vm.close()
                    slot.vm = None
        self.writer.close()  # every event the monitors delivered is stored

    # -- VMs ----------------------------------------------------------------------------

    def register(self, principal: Principal, target: str, name: str | None) -> dict[str, Any]:
        if self.store.vm_by_target(self.host, target) is not None:
            raise Problem(409, "Conflict", f"{target!r} is already registered on {self.host}")
        try:
            vm = open_vm(target)
        except (VmshieldError, OSError, ValueError) as e:  # ENAMETOOLONG, NUL bytes, ...
            raise Problem(422, "Unprocessable Content", f"cannot attach to {target!r}: {e}") from e
        vm_id = "vm-" + secrets.token_hex(6)
        self.store.ensure_tenant(principal.tenant)
        self.store.add_vm(vm_id, name or target, target, self.host, principal.tenant)
        slot = Slot(vm_id, name or target, target, principal.tenant, vm=vm)
        with self._lock:
            self.slots[vm_id] = slot
        self._publish_status(slot)
        return self.vm_view(vm_id)

    def unregister(self, vm_id: str) -> None:
        slot = self._local(vm_id)
        with slot.lock:
            self._stop(slot)
            if slot.vm is not None:
                slot.vm.close()
                slot.vm = None
            self.store.delete_vm(vm_id)
            with self._lock:
                self.slots.pop(vm_id, None)

    def vm_view(self, vm_id: str) -> dict[str, Any]:
        row = self.store.vm(vm_id)
        if row is None:
            raise not_found(f"no VM {vm_id!r}")
        return row

    def _local(self, vm_id: str) -> Slot:
        row = self.store.vm(vm_id)
        if row is None:
            raise not_found(f"no VM {vm_id!r}")
        slot = self.slots.get(vm_id)
        if slot is None:
            raise Problem(
                409,
                "Conflict",
                f"VM {vm_id} runs on host {row['host']!r}, not {self.host!r}: "
                "send this to that host's daemon",
            )
        return slot

    # -- isolation requests -------------------------------------------------------------

    def add_request(
        self, vm_id: str, obj: str, filters: dict[str, str], action: str
    ) -> dict[str, Any]:
        slot = self._local(vm_id)
        with slot.lock:
            if self.store.count_isolations(vm_id) >= MAX_REQUESTS_PER_VM:
                raise Problem(
                    409,
                    "Conflict",
                    f"VM {vm_id} has {MAX_REQUESTS_PER_VM} isolation requests (the limit): "
                    "release one first",
                )
            req_id = "iso-" + secrets.token_hex(6)
            try:
                req = IsolationRequest(
                    vm=slot.name, object=obj, filters=filters, action=action, id=req_id
                )
            except ValidationError as e:
                raise Problem(422, "Unprocessable Content", _pydantic_text(e)) from None
            except VmshieldError as e:
                raise Problem(422, "Unprocessable Content", str(e)) from None
            if slot.vm is not None:  # validated against the catalog and this kernel
                try:
                    Monitor(slot.vm, [req], engine=self.engine)
                except VmshieldError as e:
                    raise Problem(422, "Unprocessable Content", str(e)) from None
            self.store.add_isolation(req_id, vm_id, obj, filters, action)
            self.rearm(slot, new=req_id)
        out = self.store.isolation(req_id)
        assert out is not None
        return out

    def remove_request(self, req_id: str) -> None:
        row = self.store.isolation(req_id)
        if row is None:
            raise not_found(f"no isolation request {req_id!r}")
        slot = self._local(row["vm"])
        with slot.lock:
            self.store.delete_isolation(req_id)
            self.rearm(slot)

    # -- arming -------------------------------------------------------------------------

    def _attach(self, slot: Slot) -> bool:
        if slot.vm is not None:
            return True
        try:
            slot.vm = open_vm(slot.target)
            slot.error = None
            return True
        except (VmshieldError, OSError, ValueError) as e:
            slot.error = f"cannot attach to {slot.target!r}: {e}"
            self._publish_status(slot)
            return False

    def _recover(self, slot: Slot) -> None:
        """Clear what a killed daemon's monitor left in the VM (a security space with its
        patched sites, a borrowed call in flight, breakpoints), as ``vmshield detach``
        does, so the stored requests can be armed on clean functions. Records the guest
        wrote into a dead monitor's rings are not recovered."""
        from vmshield.space.borrow import borrowed, journal_path, recover_orphaned_call
        from vmshield.space.errors import StaleSpace
        from vmshield.space.space import SecuritySpace

        assert slot.vm is not None
        t, k = slot.vm.require_live("recover"), slot.vm.kernel
        try:
            if journal_path(t).exists():
                recover_orphaned_call(t, k)
            sp = SecuritySpace.load_state(t, k)
            if sp is not None and not sp.in_use_by():
                with contextlib.suppress(StaleSpace), borrowed(t, k, "teardown") as b:
                    sp.destroy(b)
            armed = t.gdb_path().with_suffix(".armed.json")
            if armed.exists():
                stub = t.gdbstub()
                try:
                    stub.detach()
                finally:
                    stub.close()
                armed.unlink(missing_ok=True)
            if not t.qmp.running():
                t.qmp.cont()
        except VmshieldError as e:
            slot.error = f"clearing what a killed monitor left: {e}"

    def _stop(self, slot: Slot) -> None:
        mon, slot.monitor = slot.monitor, None
        if mon is not None:
            try:
                mon.stop()
            except VmshieldError as e:
                slot.error = f"detach: {e}"

    def rearm(self, slot: Slot, new: str | None = None) -> None:
        """Stop the VM's monitor and start one with every stored request. If that fails
        and ``new`` was just added, it is marked failed and the rest armed again;
        otherwise the requests stay pending with the reason (retried at next start)."""
        with slot.lock:
            self._stop(slot)
            rows = [r for r in self.store.isolations(slot.id) if r["state"] != "failed"]
            if not rows:
                self._publish_status(slot)
                return
            if not self._attach(slot):
                for r in rows:
                    self.store.set_isolation_state(r["id"], "pending", slot.error)
                return
            assert slot.vm is not None
            try:
                slot.monitor = self._start_monitor(slot, slot.vm, rows)
            except VmshieldError as e:
                if new is not None:
                    self.store.set_isolation_state(new, "failed", str(e))
                    self.rearm(slot)
                    return
                slot.error = str(e)
                for r in rows:
                    self.store.set_isolation_state(r["id"], "pending", str(e))
                self._publish_status(slot)
                return
            slot.error = None
            for r in rows:
                self.store.set_isolation_state(r["id"], "armed", None)
            self._publish_status(slot)

    def _start_monitor(self, slot: Slot, vm: VM, rows: list[dict[str, Any]]) -> Monitor:
        reqs = [
            IsolationRequest(
                vm=slot.name,
                object=r["object"],
                filters=r["filters"],
                action=r["action"],
                id=r["id"],
            )
            for r in rows
        ]
        dumps = self.state_dir / "dumps" / slot.id
        dumps.mkdir(parents=True, exist_ok=True)
        mon = Monitor(vm, reqs, engine=self.engine, dump_dir=dumps)
        mon.subscribe(lambda ev: self._on_event(slot, ev))
        mon.start()
        return mon

    def _on_event(self, slot: Slot, ev: Event) -> None:
        """In the monitor's thread: hand the event to the store writer (clients see it
        only once it is committed)."""
        row = (slot.id, slot.tenant, ev.request, ev.object, ev.time, ev.to_json(), time.time())
        if not self.writer.put(row):
            with contextlib.suppress(Exception):
                self.store.count(slot.id, "drops.queue", 1)
        if ev.object == "space.ring":
            with contextlib.suppress(Exception):
                self.store.count(slot.id, "drops.ring", int(ev.fields.get("dropped", 0)))

    def watch(self) -> None:
        """Notice monitors that ended on their own (the VM went away, the engine
        failed): their requests go back to pending with the reason, and the VM's
        status shows the error. Called periodically by the app."""
        with self._lock:
            slots = list(self.slots.values())
        for slot in slots:
            if not slot.lock.acquire(blocking=False):
                continue  # being re-armed right now
            try:
                mon = slot.monitor
                if mon is None:
                    continue
                try:
                    ended = mon.wait(0)
                    why = "the monitor ended"
                except BaseException as e:  # the error that ended it
                    ended, why = True, f"the monitor ended: {e}"
                if not ended:
                    gone = self._gone(slot)
                    if gone is None:
                        continue
                    why = f"the monitor ended: {gone}"
                    # its detach cannot reach a dead QEMU; let it fail on its own thread
                    threading.Thread(target=_quiet_stop, args=(mon,), daemon=True).start()
                slot.monitor, slot.error = None, why
                for r in self.store.isolations(slot.id):
                    if r["state"] == "armed":
                        self.store.set_isolation_state(r["id"], "pending", why)
                if slot.vm is not None:
                    with contextlib.suppress(Exception):
                        slot.vm.close()
                    slot.vm = None
                self._publish_status(slot)
            finally:
                slot.lock.release()

    def _gone(self, slot: Slot) -> str | None:
        """Why the VM's QEMU is gone, or None while it runs. The security space drains
        shared RAM, which outlives QEMU, so its monitor would not notice by itself."""
        t = slot.vm.target if slot.vm is not None else None
        if t is None:
            return None
        try:
            if t.domain is not None:
                return None if t.domain.dom.isActive() else "the libvirt domain stopped"
            pid = socket_peer_pid(t.qmp_path, timeout=2.0)
            os.kill(pid, 0)
        except (VmshieldError, ProcessLookupError) as e:
            return f"QEMU is gone ({e})"
        except Exception:  # libvirt errors: the domain is unknown now
            return "QEMU is gone"
        return None

    # -- status -------------------------------------------------------------------------

    def status(self, slot: Slot) -> dict[str, Any]:
        mon = slot.monitor
        out: dict[str, Any] = {
            "engine": None,
            "security_space": "none",
            "armed_points": 0,
            "fell_back": False,
            "last_error": slot.error or self.writer.error,
            "symbol_source": "kallsyms+btf from guest memory" if slot.vm else None,
            "updated": time.time(),
        }
        if mon is not None and mon.engine_kind is not None:
            out["engine"] = mon.engine_kind.value
            out["armed_points"] = len(mon.resolved)
            out["security_space"] = "active" if mon.engine_kind == EngineKind.SPACE else "none"
            out["fell_back"] = mon.fell_back
        return out

    def _publish_status(self, slot: Slot) -> None:
        if slot.vm is not None:
            slot.kernel = slot.vm.kernel.release
        self.store.set_vm_status(slot.id, slot.kernel, self.status(slot))

    def armed_points(self) -> dict[str, int]:
        with self._lock:
            slots = list(self.slots.values())
        return {s.id: (len(s.monitor.resolved) if s.monitor is not None else 0) for s in slots}

    def event_drops(self) -> dict[str, int]:
        """Events a subscriber queue lost, per VM (zero: the daemon subscribes by
        callback, kept for completeness)."""
        with self._lock:
            slots = list(self.slots.values())
        return {s.id: (s.monitor.dropped if s.monitor is not None else 0) for s in slots}


def _quiet_stop(mon: Monitor) -> None:
    with contextlib.suppress(BaseException):
        mon.stop()


def _pydantic_text(e: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or 'request'}: {err['msg']}" for err in e.errors()
    )


def dumps_status(row: dict[str, Any]) -> str:
    return json.dumps(row["status"])
