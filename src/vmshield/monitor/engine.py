"""The exit-based engine: breakpoint exits as switch gate, this process as security space.

Per event: one stop, one ``g`` (registers), one ``P rip`` (or one ``G`` for deny), one
``c``; guest memory is read through the shared RAM mapping with no round trip. The
breakpoints stay inserted for the whole session (toggling them makes TCG retranslate).
Armed points are recorded in a state file so that ``vmshield detach`` can clear them
if this process dies (QEMU keeps breakpoints of a vanished gdb client, and would stop
the guest at the next hit).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmshield.errors import HypervisorError, VmshieldError
from vmshield.guest.kconsts import tif_sigpending_bit
from vmshield.guest.kernel import Kernel
from vmshield.guest.tasks import TaskReader
from vmshield.hv.gdbpackets import SIGINT, GdbTimeout, X86Registers
from vmshield.hv.gdbstub import GdbStub
from vmshield.hv.target import Target
from vmshield.monitor.actions import DumpPolicy, pause_vm, vm_status
from vmshield.monitor.context import HitContext
from vmshield.monitor.dispatch import Hit, dispatch
from vmshield.monitor.events import Event, PointInfo
from vmshield.monitor.kinds import EngineKind
from vmshield.monitor.request import ResolvedRequest
from vmshield.paths import write_private

EPERM = 1
SIGKILL = 9


@dataclass
class Stats:
    hits: int = 0
    events: int = 0
    filtered: int = 0
    decode_errors: int = 0
    other_stops: int = 0
    round_trips: int = 0  # gdbstub requests answered while handling hits (g, P, G)
    by_object: dict[str, int] = field(default_factory=dict)


class ExitEngine:
    kind = EngineKind.EXIT

    def __init__(
        self,
        target: Target,
        kernel: Kernel,
        requests: list[ResolvedRequest],
        emit: Callable[[Event], None],
        dump_dir: Path | None = None,
        dump_interval: float = 10.0,
    ) -> None:
        self.t = target
        self.k = kernel
        self.requests = requests
        self.emit = emit
        self.dumps = DumpPolicy(dump_dir or Path.cwd(), dump_interval)
        self.tasks = TaskReader(kernel)
        self.by_addr: dict[int, list[ResolvedRequest]] = {}
        for r in requests:
            self.by_addr.setdefault(r.point.address, []).append(r)
        self.stub: GdbStub | None = None
        # Called from the loop with a way to stop every vCPU (the integrity checker).
        self.periodic: Callable[[Callable[[Callable[[GdbStub], None]], None]], None] | None = None
        # Called at a hit with every vCPU stopped: (stub, registers, vCPU) (the checker).
        self.at_stop: Callable[[GdbStub, X86Registers, int], None] | None = None
        self.stats = Stats()
        self._pending: list[Event] = []  # events of the hit being handled
        self.paused = False
        self._guard: subprocess.Popen[bytes] | None = None
        self._guard_pipe: int | None = None
        self._state = target.gdb_path().with_suffix(".armed.json")
        # TIF_SIGPENDING differs between releases (2 up to 6.x, 1 on 7.3): read it from
        # the kernel's code before arming, so a kill never flags the wrong bit.
        kills = any(r.request.action == "kill" for r in requests)
        self._tif_sigpending = tif_sigpending_bit(kernel) if kills else None

    # -- arm / detach -------------------------------------------------------------------

    def arm(self) -> None:
        self.stub = self.t.gdbstub()
        self._start_guard(self.stub.fileno())
        write_private(self._state, json.dumps({"points": {
            f"{a:#x}": [r.request.id for r in rs] for a, rs in self.by_addr.items()}}).encode(),
        )  # fmt: skip
        try:
            for addr in self.by_addr:
                self.stub.insert_breakpoint(addr)
        except BaseException:
            self.detach()
            raise
        self.stub.cont()

    def _start_guard(self, fd: int) -> None:
        """See :mod:`vmshield.hv.gdbguard`: if this process dies, the guest goes on."""
        r, w = os.pipe()
        try:
            self._guard = subprocess.Popen(
                [sys.executable, "-m", "vmshield.hv.gdbguard", str(fd), str(r), str(self._state)],
                pass_fds=(fd, r),
                start_new_session=True,
                stdin=subprocess.DEVNULL,
            )
        finally:
            os.close(r)
        self._guard_pipe = w

    def _stop_guard(self) -> None:
        if self._guard_pipe is not None:
            with contextlib.suppress(OSError):
                os.write(self._guard_pipe, b"x")
            os.close(self._guard_pipe)
            self._guard_pipe = None
        if self._guard is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._guard.wait(5)
            self._guard = None

    def detach(self) -> None:
        """Remove every breakpoint and let the guest run; idempotent.

        Works whatever state the session is in: a stop reply on its way, a VM that a
        ``pause`` action (or an operator) left stopped, a VM running. A VM that our
        ``pause`` left paused is paused again after the detach (QEMU resumes the VM on
        ``D``): the pause is the operator's to end with ``vmshield resume``.
        """
        stub, self.stub = self.stub, None
        if stub is None:
            return
        self._stop_guard()
        keep_paused = False
        try:
            if stub.running:
                keep_paused = self._settle(stub)
            for addr in self.by_addr:
                with contextlib.suppress(VmshieldError):
                    stub.remove_breakpoint(addr)
            stub.detach()  # QEMU also drops all breakpoints and resumes on detach
        finally:
            stub.close()
            self._state.unlink(missing_ok=True)
        if keep_paused:
            pause_vm(self.t)

    def _settle(self, stub: GdbStub) -> bool:
        """Bring a session that expects a stop reply back to stopped; True when the VM
        was left stopped by a pause (ours or an operator's), not by us now.

        QEMU's run state decides: a running VM gets an interrupt and answers it; a
        stopped one may still have a stop reply in the socket (a hit just before), and
        otherwise none will come (QEMU ignores an interrupt byte while stopped).
        """
        status = vm_status(self.t)
        if status == "running":
            stub.interrupt()
            for _ in range(3):
                with contextlib.suppress(GdbTimeout):
                    stub.wait_stop(5)
                    return False
                if vm_status(self.t) != "running":  # stopped, the reply lost or late
                    break
            else:
                raise HypervisorError("the VM did not stop for detach within 15 s")
        with contextlib.suppress(GdbTimeout):
            stub.wait_stop(0.3)  # a stop reported just before the VM stopped
        if stub.running:
            stub.assume_stopped()
        return status == "paused" or (self.paused and status == "debug")

    # -- the loop -----------------------------------------------------------------------

    def run(self, duration: float | None, should_stop: Callable[[], bool]) -> None:
        """Handle stops until told to stop. A paused VM needs nothing special: once the
        operator resumes it, its next hit arrives as an ordinary stop reply."""
        assert self.stub is not None
        end = time.monotonic() + duration if duration else None
        next_flush = time.monotonic() + 1.0
        while not should_stop() and (end is None or time.monotonic() < end):
            if time.monotonic() > next_flush:  # the guest may remap kernel memory
                self.k.walker.flush()
                next_flush = time.monotonic() + 1.0
            if self.periodic is not None:
                self.periodic(self._quiesced)
            try:
                self.stub.wait_stop(0.2)
            except GdbTimeout:
                continue
            self.paused = False  # whatever stopped, the VM ran again since the pause
            self.on_stop()

    def _quiesced(self, fn: Callable[[GdbStub], None]) -> None:
        """Run ``fn`` with every vCPU stopped: interrupt, ``fn``, resume. A breakpoint hit
        that won the race with the interrupt is handled as any hit, not lost."""
        stub = self.stub
        if stub is None or not stub.running:
            return
        stub.interrupt()
        stop = stub.wait_stop(5)
        try:
            fn(stub)
        finally:
            if stop.signal == SIGINT:
                stub.cont_all()
            else:
                self.on_stop()

    def on_stop(self) -> None:
        stub = self.stub
        assert stub is not None
        regs = stub.read_registers()
        self.stats.round_trips += 1
        reqs = self.by_addr.get(regs.rip)
        if reqs is None:
            self.stats.other_stops += 1
            stop = stub.stop_reply
            if stop is not None and stop.signal == SIGINT and vm_status(self.t) == "paused":
                # Someone paused the VM through QMP (an operator, `virsh suspend`):
                # QEMU told us with this stop. Continuing would undo their pause.
                stub.await_external_resume()
                return
            stub.cont()
            return
        self.stats.hits += 1
        if self.at_stop is not None:  # the integrity checker's look while all are stopped
            stop = stub.stop_reply
            tid = stop.thread.tid if stop is not None and stop.thread is not None else 1
            self.at_stop(stub, regs, max(0, tid - 1))
        verdict = self.handle(regs, reqs)
        if verdict == "deny":
            self._return_eperm(regs)
        elif reqs[0].point.on_nop:
            stub.write_register("rip", reqs[0].point.resume)
        # else: no NOP to skip (user code); cont() steps over the instruction first.
        self.stats.round_trips += 1
        if verdict == "pause" and reqs[0].point.on_nop:
            # The pause is this stop: the VM stays stopped past the NOP until the
            # operator resumes it (QMP cont), and its next hit comes as a stop reply.
            stub.await_external_resume()
            self.paused = True
        else:
            stub.cont()
            if verdict == "pause":  # a user-code point: step over it first, then pause
                pause_vm(self.t)
                self.paused = True
        # Events go out once their actions have taken effect: whoever reads a pause
        # event finds the VM paused.
        events, self._pending = self._pending, []
        for ev in events:
            self.emit(ev)

    def handle(self, regs: X86Registers, reqs: list[ResolvedRequest]) -> str:
        """Decode, filter and act for every request on the point (see
        :mod:`vmshield.monitor.dispatch`); returns the strongest action taken."""
        cpu = 0
        if stub_stop := (self.stub.stop_reply if self.stub else None):
            cpu = max(0, (stub_stop.thread.tid - 1) if stub_stop.thread else 0)
        ctx = HitContext(self.k, self.tasks, regs, cpu)

        def point(r: ResolvedRequest) -> PointInfo:
            kernel = r.point.on_nop or bool(r.point.address >> 63)
            return PointInfo(symbol=r.point.symbol, address=f"{r.point.address:#x}",
                             kind="kernel-function" if kernel else "user-function",
                             engine="exit", cpu=cpu)  # fmt: skip

        hit = Hit(
            vm=self.t.name, time=time.time(), process=ctx.process(),
            decode=lambda r: r.obj.decoder(ctx), act=lambda a, r: self._act(a, r, ctx),
            point=point, errors=ctx.errors,
        )  # fmt: skip
        return dispatch(hit, reqs, self.stats, self._pending.append)

    # -- actions ------------------------------------------------------------------------

    def _act(self, action: str, r: ResolvedRequest, ctx: HitContext) -> dict[str, Any]:
        if action == "kill":
            self._kill(ctx.current)
            return {"signal": "SIGKILL"}
        if action == "dump":
            return self.dumps.dump(self.t, r.request.id)
        if action == "pause":
            return {"paused": True}
        return {}

    def _kill(self, task: int) -> None:
        """Queue SIGKILL for the whole thread group and flag the task, as the kernel's
        own send_signal would: a data write (shared RAM), no code runs in the guest.
        The task dies on its way back to user mode."""
        k = self.k
        sig = k.u64(task + k.member_offset("task_struct", "signal"))
        pend = sig + k.member_offset("signal_struct", "shared_pending.signal")
        self._or_u64(pend, 1 << (SIGKILL - 1))
        if self._tif_sigpending is None:
            self._tif_sigpending = tif_sigpending_bit(k)
        self._or_u64(
            task + k.member_offset("task_struct", "thread_info.flags"), 1 << self._tif_sigpending
        )

    def _or_u64(self, va: int, bits: int) -> None:
        pa = self.k.walker.translate(va)
        mem = self.t.mem
        val = int.from_bytes(mem.read(pa, 8), "little") | bits
        mem.write(pa, val.to_bytes(8, "little"))

    def _return_eperm(self, regs: X86Registers) -> None:
        """Make the function return -EPERM to its caller at once (its first instruction
        has not run: the return address is at rsp)."""
        assert self.stub is not None
        ret = self.k.walker.read_u64(regs.rsp) if regs.rsp >> 63 else None
        if ret is None:
            raise HypervisorError("deny: stack pointer is not a kernel address")
        regs.rax = (-EPERM) & ((1 << 64) - 1)
        regs.rip = ret
        regs.rsp = regs.rsp + 8
        self.stub.write_registers(regs, use_g=True)
