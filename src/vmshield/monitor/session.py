"""A monitor run as a library object: ``Monitor(vm, requests)``.

Why here and not in the CLI: the choice of engine, the fallback from the security space
to breakpoint exits, the switch after tampering (carrying the remaining duration), the
event fan-out and the summary are what every front end needs (CLI, daemon, benchmarks,
tests, users' scripts). The CLI only renders.

    with vmshield.open_vm("lab1") as vm:
        req = vmshield.IsolationRequest(vm=vm.name, object="file.open",
                                        filters={"path": "/etc/*"})
        with vmshield.Monitor(vm, [req]) as mon:
            for event in mon.events():
                print(event.process.comm, event.fields["path"])

Threads: :meth:`Monitor.start` arms the points in the caller's thread (errors surface
there, nothing is left armed), then one background thread runs the engine until
:meth:`Monitor.stop` or the duration ends, and detaches. Subscribers' callbacks run in
that thread; :meth:`Monitor.events` gives each reader its own bounded queue, and a
reader that falls behind loses events counted in :attr:`Monitor.dropped`, never the
monitor's time.
"""

from __future__ import annotations

import contextlib
import math
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from vmshield.errors import VmshieldError
from vmshield.guest.vm import VM
from vmshield.monitor.actions import DumpPolicy
from vmshield.monitor.engine import ExitEngine
from vmshield.monitor.events import Event
from vmshield.monitor.integrity import Checker
from vmshield.monitor.kinds import Action, EngineKind, TamperPolicy, parse_choice
from vmshield.monitor.request import (
    IsolationRequest,
    RequestError,
    ResolvedRequest,
    is_integrity,
    resolve_all,
    validate,
)
from vmshield.monitor.space_engine import SpaceEngine, SpaceStats
from vmshield.monitor.space_engine import unsupported as space_unsupported
from vmshield.space import layout as L

Callback = Callable[[Event], None]
_END = object()


@dataclass
class Summary:
    """What a run did, for a person or a program to render."""

    engine: str
    hits: int = 0
    events: int = 0
    filtered: int = 0
    decode_errors: int = 0
    by_object: dict[str, int] = field(default_factory=dict)
    drops: int = 0  # space: records the guest could not queue (rings full)
    alerts: int = 0  # space: integrity alerts
    round_trips_per_hit: float = 0.0  # exit engine: gdbstub requests per hit
    subscriber_drops: int = 0  # events a slow events() reader did not get


class Monitor:
    """Isolation requests armed in one VM, with engine choice and fallback.

    ``requests`` are validated against the catalog and this kernel when the monitor is
    made (:class:`RequestError` names the object, the key and the reason); nothing
    touches the guest before :meth:`start`. ``notes`` receives what a user should be
    told (why the exit engine was chosen, which behaviours are only logged, ...).
    ``ring_size``: bytes of records per vCPU in the security space (a power of two,
    64 KiB to 256 MiB; default: sized from guest RAM), for a space this monitor builds.
    ``aggregate``: seconds; the security space counts the hits of ``log`` requests whose
    filters it evaluates itself per (object, task, comm, the object's key: path, address
    and port, new euid or module name) in the guest instead of
    recording each, and one ``space.aggregate`` event every ``aggregate`` seconds
    carries the counts (for high-frequency points: rates rather than every call).
    """

    def __init__(
        self,
        vm: VM,
        requests: Sequence[IsolationRequest],
        *,
        engine: EngineKind | str = EngineKind.AUTO,
        on_tamper: TamperPolicy | str = TamperPolicy.REARM,
        dump_dir: Path | None = None,
        dump_interval: float = 10.0,
        check_interval: float = 1.0,
        notes: Callable[[str], None] | None = None,
        ring_size: int | None = None,
        aggregate: float | None = None,
    ) -> None:
        self.vm = vm
        self.target = vm.require_live("monitor")
        self.engine_choice = parse_choice(EngineKind, engine, "engine")
        self.on_tamper = parse_choice(TamperPolicy, on_tamper, "tamper policy")
        if not (math.isfinite(check_interval) and check_interval > 0):
            raise VmshieldError(f"check interval {check_interval}: must be a positive number")
        if not (math.isfinite(dump_interval) and dump_interval >= 0):
            raise VmshieldError(f"dump interval {dump_interval}: must be 0 or more seconds")
        if not requests:
            raise RequestError("no isolation request given")
        if ring_size is not None:
            try:
                L.check_ring_size(ring_size)
            except ValueError as e:
                raise VmshieldError(str(e)) from e
        self.ring_size = ring_size
        if aggregate is not None and not (math.isfinite(aggregate) and aggregate > 0):
            raise VmshieldError(f"aggregate interval {aggregate}: must be a positive number")
        self.aggregate = aggregate
        self.dump_dir = dump_dir or Path.cwd()
        self.dump_interval = dump_interval
        self.check_interval = check_interval
        self._notes = notes or (lambda _text: None)
        self.notes: list[str] = []
        self.requests = list(requests)
        self.resolved: list[ResolvedRequest] = []
        # Sensitive-module objects have no monitoring point: the host checks them
        # (monitor/integrity.py) from whichever engine's loop runs.
        self.integrity = [r for r in self.requests if is_integrity(r.object)]
        for req in self.integrity:
            parse_choice(Action, req.action, "action")
            validate(req)
        if len({r.object for r in self.integrity}) != len(self.integrity):
            raise RequestError("an integrity object may be requested once per monitor")
        self.checker: Checker | None = None
        for req in self.requests:
            if is_integrity(req.object):
                continue
            parse_choice(Action, req.action, "action")
            subs = resolve_all(req, vm.kernel)
            logged = [r.request.object for r in subs if r.request.action != req.action]
            if logged:  # process:X with an action not every behaviour can take
                self._note(
                    f"{req.object}: action {req.action} applies where the behaviour allows "
                    f"it; logged only: {', '.join(logged)}"
                )
            self.resolved.extend(subs)
        self.engine: ExitEngine | SpaceEngine | None = None
        self.fell_back = False  # the space was tampered with and removed mid-run
        self._summary_space: Summary | None = None  # the space's counts, after a fallback
        self._callbacks: list[Callback] = []
        self._line_callbacks: list[tuple[Callable[[str], None], Callable[[], None] | None]] = []
        self._queues: list[queue.Queue[Any]] = []
        self._lock = threading.Lock()
        self.dropped = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._duration: float | None = None
        self._started_at = 0.0

    # -- events ---------------------------------------------------------------------------

    def subscribe(self, callback: Callback) -> Callable[[], None]:
        """Call ``callback`` for every event (in the monitor's thread: keep it short);
        returns the function that unsubscribes it."""
        with self._lock:
            self._callbacks.append(callback)

        def unsubscribe() -> None:
            with self._lock:
                if callback in self._callbacks:
                    self._callbacks.remove(callback)

        return unsubscribe

    def subscribe_json(
        self, callback: Callable[[str], None], flush: Callable[[], None] | None = None
    ) -> Callable[[], None]:
        """Call ``callback`` with every event as one ``vmshield.event/1`` JSON line (the
        text of :meth:`Event.to_json`), in the monitor's thread, and ``flush`` after
        each batch of lines. The security space writes these lines straight from its
        records, without making :class:`Event` objects when nobody else reads them: the
        fast way to a log (the CLI's ``--json``). Returns the function that
        unsubscribes it."""
        entry = (callback, flush)
        with self._lock:
            self._line_callbacks = [*self._line_callbacks, entry]

        def unsubscribe() -> None:
            with self._lock:
                self._line_callbacks = [e for e in self._line_callbacks if e is not entry]

        return unsubscribe

    def _wants_events(self) -> bool:
        return bool(self._callbacks or self._queues)

    def _publish_json(self, line: str) -> None:
        # Called per event on the hot path: no lock, no copy (subscribe_json replaces the
        # list rather than changing it, so iterating the one read here is safe).
        for cb, _flush in self._line_callbacks:
            cb(line)

    def _flush_json(self) -> None:
        with self._lock:
            callbacks = list(self._line_callbacks)
        for _cb, flush in callbacks:
            if flush is not None:
                flush()

    def _publish_any(self, ev: Event) -> None:
        """Events the exit engine makes: to every reader, and as a line to the JSON
        subscribers (flushed at once: exit-engine events come one at a time)."""
        self._publish(ev)
        if self._line_callbacks:
            self._publish_json(ev.to_json())
            self._flush_json()

    def events(self, maxsize: int = 65536) -> Iterator[Event]:
        """Events from now on, until the monitor has stopped and all were read. The
        reader's queue exists from this call (not from the first ``next``). A reader
        more than ``maxsize`` events behind loses the newest (counted in
        :attr:`dropped`)."""
        q: queue.Queue[Any] = queue.Queue(maxsize)
        with self._lock:
            finished = self._thread is not None and not self._thread.is_alive()
            if not finished:
                self._queues.append(q)
        return iter(()) if finished else self._read(q)

    def _read(self, q: queue.Queue[Any]) -> Iterator[Event]:
        try:
            while True:
                item = q.get()
                if item is _END:
                    return
                yield item
        finally:
            with self._lock:
                if q in self._queues:
                    self._queues.remove(q)

    def _publish(self, ev: Event) -> None:
        with self._lock:
            callbacks, queues = list(self._callbacks), list(self._queues)
        for cb in callbacks:
            cb(ev)
        for q in queues:
            try:
                q.put_nowait(ev)
            except queue.Full:
                with self._lock:
                    self.dropped += 1

    def _note(self, text: str) -> None:
        self.notes.append(text)
        self._notes(text)

    # -- arming and running ---------------------------------------------------------------

    @property
    def engine_kind(self) -> EngineKind | None:
        """The engine in use (after :meth:`start`)."""
        if self.engine is None:
            return None
        return EngineKind.SPACE if isinstance(self.engine, SpaceEngine) else EngineKind.EXIT

    def _exit_engine(self) -> ExitEngine:
        return ExitEngine(
            self.target, self.vm.kernel, self.resolved, self._publish_any,
            dump_dir=self.dump_dir, dump_interval=self.dump_interval,
        )  # fmt: skip

    def arm(self) -> None:
        """Choose the engine and place the points; the VM runs on. Raises (with nothing
        left armed) when the requests cannot be served."""
        if self.engine is not None:
            raise VmshieldError("this monitor is already armed")
        dumps = any(r.request.action == Action.DUMP for r in self.resolved)
        if dumps or any(r.action == Action.DUMP for r in self.integrity):
            DumpPolicy(self.dump_dir, self.dump_interval).check(self.target)
        choice = self.engine_choice
        why = space_unsupported(self.resolved)
        if not self.resolved:  # integrity objects alone: a gdbstub with no points
            why = "integrity objects only (checked from the host)"
        needs_space = [r.object for r in self.integrity if r.object == "space.self"]
        if needs_space and (choice == EngineKind.EXIT or why):
            raise RequestError(
                "space.self needs the security space: use --engine space with at least "
                "one behaviour object"
            )
        if self.integrity:  # the reference: before our own breakpoints or gates exist
            self.checker = Checker(
                self.target, self.vm.kernel, self.integrity, self._publish, engine="?",
                interval=self.check_interval,
                dump_policy=DumpPolicy(self.dump_dir, self.dump_interval),
            )  # fmt: skip
            self.checker.reference()
        if choice == EngineKind.SPACE and why:
            raise VmshieldError(f"the security space cannot serve this: {why}")
        if choice != EngineKind.EXIT and not why:
            eng = SpaceEngine(
                self.target, self.vm.kernel, self.resolved, self._publish,
                dump_dir=self.dump_dir, dump_interval=self.dump_interval,
                check_interval=self.check_interval, policy=self.on_tamper.value,
                ring_size=self.ring_size, emit_json=self._publish_json,
                aggregate=self.aggregate,
            )  # fmt: skip
            eng.wants_events = self._wants_events
            eng.wants_lines = lambda: bool(self._line_callbacks)
            eng.lines_done = self._flush_json
            try:
                eng.arm()
                self.engine = eng
                for why in eng.not_aggregated:
                    self._note(f"--aggregate: {why}")
            except VmshieldError as e:
                if choice == EngineKind.SPACE or eng.space is not None:  # never two engines
                    raise
                why = f"building the security space failed: {e}"
        if self.engine is None:
            if choice == EngineKind.AUTO:
                self._note(f"engine auto: using exit ({why})")
            if self.aggregate:
                self._note("--aggregate applies to the security space only: every hit is an event")
            ex = self._exit_engine()
            ex.arm()
            self.engine = ex
        self._hook_checker()
        self.target.qmp.close()  # reconnected only for pause/dump: others may use QMP

    def _hook_checker(self) -> None:
        """Give the engine in use the integrity checker (one small call in its loop)."""
        ck, eng = self.checker, self.engine
        if ck is None or eng is None:
            return
        ck.engine = str(eng.kind)
        if isinstance(eng, ExitEngine):
            for addr in eng.by_addr:  # our breakpoints are int3 in guest memory on KVM
                ck.allow_breakpoint(addr)
            eng.at_stop = ck.at_stop
        else:
            ck.own_memory = lambda: (
                [(r.base, r.base + r.size)] if eng.space and (r := eng.space.region) else []
            )
        if isinstance(eng, SpaceEngine):  # the space's own alerts, as the requests' events
            emit = eng.emit

            def relay(ev: Event) -> None:
                emit(ev)
                if ev.object == "space.integrity":
                    ck.space_alert(ev)

            eng.emit = relay
        eng.periodic = ck.tick

    def start(self, duration: float | None = None) -> Monitor:
        """Arm, then run in a background thread until :meth:`stop` or ``duration``
        seconds; returns once the points are in place."""
        if duration is not None and not (math.isfinite(duration) and duration > 0):
            raise VmshieldError(f"duration {duration}: must be a positive number of seconds")
        self.arm()
        self._duration = duration
        self._started_at = time.monotonic()
        self._thread = threading.Thread(target=self._loop, name="vmshield-monitor", daemon=True)
        self._thread.start()
        return self

    def _remaining(self) -> float | None:
        if self._duration is None:
            return None
        return max(0.1, self._duration - (time.monotonic() - self._started_at))

    def _loop(self) -> None:
        try:
            assert self.engine is not None
            self.engine.run(self._remaining(), self._stop.is_set)
            eng = self.engine
            if isinstance(eng, SpaceEngine) and eng.fallback_requested and not self._stop.is_set():
                self._note(
                    "security space tampered with: removing it; the requests continue on "
                    "the exit engine"
                )
                eng.detach()
                self._summary_space = self._summarise(eng)
                ex = self._exit_engine()
                ex.arm()
                self.target.qmp.close()
                self.engine, self.fell_back = ex, True
                self._hook_checker()
                self._note(f"armed {len(self.resolved)} point(s) (engine exit)")
                ex.run(self._remaining(), self._stop.is_set)
        except BaseException as e:
            self._error = e
        finally:
            try:
                if self.engine is not None:
                    self.engine.detach()
            except BaseException as e:
                self._error = self._error or e
            self._close_queues()

    def _close_queues(self) -> None:
        """Every events() reader ends after the events it already has."""
        with self._lock:
            queues = list(self._queues)
        for q in queues:
            while True:
                try:
                    q.put(_END, timeout=0.1)
                    break
                except queue.Full:  # make room: the newest event is lost, and counted
                    with self._lock:
                        self.dropped += 1
                    with contextlib.suppress(queue.Empty):
                        q.get_nowait()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the run to end (duration over, or stopped); True if it has ended.
        Re-raises an error that ended it."""
        if self._thread is None:
            return True
        self._thread.join(timeout)
        if self._thread.is_alive():
            return False
        if self._error is not None:
            err, self._error = self._error, None
            raise err
        return True

    def stop(self) -> None:
        """Detach: every point removed, every byte restored (returns when done)."""
        self._stop.set()
        if self._thread is None:
            try:
                if self.engine is not None:  # armed but never started
                    self.engine.detach()
            finally:
                self._close_queues()
            return
        self.wait()

    def __enter__(self) -> Monitor:
        if self._thread is None:
            self.start()
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- results --------------------------------------------------------------------------

    @property
    def stats(self) -> Any:
        """The engine's live counters (see :class:`Summary` for a stable view)."""
        return self.engine.stats if self.engine is not None else None

    def _summarise(self, eng: ExitEngine | SpaceEngine) -> Summary:
        s = eng.stats
        out = Summary(
            engine=EngineKind.SPACE if isinstance(eng, SpaceEngine) else EngineKind.EXIT,
            hits=s.hits, events=s.events, filtered=s.filtered,
            decode_errors=s.decode_errors, by_object=dict(s.by_object),
            subscriber_drops=self.dropped,
        )  # fmt: skip
        if isinstance(s, SpaceStats):
            out.drops, out.alerts = s.drops, s.alerts
        else:
            out.round_trips_per_hit = s.round_trips / s.hits if s.hits else 0.0
        return out

    def summary(self) -> Summary:
        """Counts of the run so far (both engines added up after a fallback)."""
        if self.engine is None:
            return Summary(engine=str(self.engine_choice))
        cur = self._summarise(self.engine)
        before = self._summary_space
        if before is None:
            return cur
        for name, n in before.by_object.items():
            cur.by_object[name] = cur.by_object.get(name, 0) + n
        cur.hits += before.hits
        cur.events += before.events
        cur.filtered += before.filtered
        cur.decode_errors += before.decode_errors
        cur.drops, cur.alerts = before.drops, before.alerts
        return cur
