"""Calling the guest kernel's own functions from the hypervisor, on a borrowed vCPU.

Why: executable memory must come from the guest kernel's allocator (so the kernel's
bookkeeping, W^X accounting and direct-map aliases stay right), and only code running in
the guest can call it. We wait until some task enters a syscall (process context, IRQs
on, no locks, preemption allowed), park it, point its vCPU at the function with a forged
return address, let the whole VM run, and catch the return on a breakpoint placed on a
padding byte nothing executes. The allocator may sleep, so the task can come back on
another vCPU: the return is recognised by address, stack pointer and task, and only the
task's own registers (GPRs, rip, rflags) are put back; per-CPU state (GS base, CR3) is
never copied between vCPUs.

A :class:`Borrow` keeps the task parked (VM stopped) between calls, so a build can
allocate, write code, change permissions and patch sites in one stop.

A call in flight is journaled (``gdb.borrow.json`` beside the gdbstub socket) before the
vCPU is redirected: the saved registers, the forged return slot and the breakpoint. If
the monitor dies meanwhile, the guest would crash on returning to the padding byte once
a debugger resumed it blindly; :func:`finish_orphaned_call` (run by every later
:func:`borrowed` session, and so by ``vmshield detach``) waits for that return, puts the
task's registers and stack slot back, and undoes the call's result where it was an
allocation nobody recorded.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from vmshield.errors import HypervisorError, SymbolError
from vmshield.guest.ftrace import place_point
from vmshield.guest.kernel import Kernel
from vmshield.guest.tasks import current_task_offset, percpu_va
from vmshield.hv.gdbpackets import GdbTimeout, X86Registers
from vmshield.hv.gdbstub import GdbStub
from vmshield.hv.target import Target
from vmshield.paths import read_private, write_private

# Syscall entries that a live system reaches often; the first eligible hit is borrowed.
BORROW_SITES = (
    "__x64_sys_read", "__x64_sys_write", "__x64_sys_getpid", "__x64_sys_getppid",
    "__x64_sys_clock_nanosleep", "__x64_sys_nanosleep", "__x64_sys_poll",
    "__x64_sys_pselect6", "__x64_sys_wait4", "__x64_sys_ioctl", "__x64_sys_rt_sigaction",
    # An idle guest makes no syscalls, but its periodic work items still run in
    # workqueue workers (measured on an idle lab guest, all three kernels: psi_avgs_work
    # every 2 s, vmstat_shepherd about every second).
    "vmstat_shepherd", "psi_avgs_work", "vmstat_update", "neigh_periodic_work",
)  # fmt: skip
# Functions whose preceding padding byte may serve as the return breakpoint.
RETURN_PAD_CANDIDATES = ("__x64_sys_getpid", "__x64_sys_getppid", "__x64_sys_sync", "vfree")
EFLAGS_IF = 1 << 9
PF_KTHREAD = 0x00200000
WritePhys = Callable[[int, bytes], None]
HARD_TIMEOUT_FACTOR = 10
RED_ZONE = 256  # below the borrowed task's rsp, untouched
MIN_STACK_LEFT = 8 << 10
ARG_REGS = ("rdi", "rsi", "rdx", "rcx", "r8", "r9")
RESTORED = (
    "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
    "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "eflags",
)  # fmt: skip


class BorrowError(HypervisorError):
    """No vCPU could be borrowed, or a borrowed call failed."""


FAULT_ENV = "VMSHIELD_FAULT"
"""Fault injection for the recovery tests: ``kill-in-call:PURPOSE:FUNCTION`` (``*`` for
any function) makes this process SIGKILL itself while that call runs in the guest."""


@dataclass
class CallJournal:
    """What undoing a borrowed call needs if its caller dies while the guest runs it."""

    purpose: str  # build, rearm, teardown, ...
    function: str
    task: int
    pad: int  # the return breakpoint
    ret_rsp: int  # rsp when the call has returned
    slot_pa: int  # the forged return slot, and what it held before
    saved_slot: str
    regs: dict[str, int]  # the parked task's own registers (RESTORED)
    undo: str | None  # a kernel function to call on the result (an unrecorded allocation)
    pid: int  # the process that started the call

    def save(self, path: Path) -> None:
        write_private(path, json.dumps(asdict(self)).encode())

    @classmethod
    def load(cls, path: Path) -> CallJournal | None:
        try:
            d = json.loads(read_private(path))
            j = cls(**d)
            j.regs = {str(k): int(v) for k, v in j.regs.items()}
            if set(j.regs) != set(RESTORED):
                raise ValueError("register set differs")
            bytes.fromhex(j.saved_slot)
        except FileNotFoundError:
            return None
        except (TypeError, ValueError, AttributeError, OSError) as e:
            raise BorrowError(f"{path}: unreadable borrowed-call journal ({e})") from e
        return j


def journal_path(t: Target) -> Path:
    return t.gdb_path().with_suffix(".borrow.json")


def _fault(purpose: str, function: str) -> None:
    spec = os.environ.get(FAULT_ENV, "")
    if not spec.startswith("kill-in-call:"):
        return
    want_purpose, _, want_fn = spec[len("kill-in-call:") :].partition(":")
    if want_purpose == purpose and want_fn in ("*", "", function):
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class _Parked:
    regs: X86Registers  # the task's registers at the borrow site
    task: int
    site: int
    tid: int  # gdbstub thread (vCPU index + 1) the task is parked on


def preempt_count_offset(k: Kernel) -> int:
    """Per-cpu offset of the preempt count: ``__preempt_count`` (5.10/6.1) or
    ``pcpu_hot.preempt_count`` (6.12); 7.3 has ``__preempt_count`` again."""
    if "__preempt_count" in k.symbols:
        return k.symbols.address("__preempt_count")
    return k.symbols.address("pcpu_hot") + k.member_offset("pcpu_hot", "preempt_count")


def return_pad(k: Kernel) -> int:
    """A byte nothing executes: int3/nop padding just before a function's entry."""
    for name in RETURN_PAD_CANDIDATES:
        if name not in k.symbols:
            continue
        addr = k.symbols.address(name) - 1
        if k.read(addr, 1) in (b"\xcc", b"\x90"):
            return addr
    raise BorrowError("no padding byte found for the return breakpoint")


class Borrow:
    """A task parked at a syscall entry whose vCPU runs kernel functions for us.

    Use as a context manager: on exit the task resumes exactly where it was parked
    (the stub is left stopped; the caller continues the VM).
    """

    def __init__(
        self,
        stub: GdbStub,
        kernel: Kernel,
        write_phys: WritePhys,
        timeout: float = 30.0,
        *,
        journal: Path | None = None,
        purpose: str = "call",
    ) -> None:
        self.stub = stub
        self.journal = journal
        self.purpose = purpose
        self.k = kernel
        self.write_phys = write_phys
        self.timeout = timeout
        self._cur = current_task_offset(kernel)
        self._preempt = preempt_count_offset(kernel)
        self._pad = return_pad(kernel)
        self._parked: _Parked | None = None
        self.calls = 0
        # True while the guest runs a call we started and we have not seen it return:
        # its return address is our breakpoint, so nothing may be undone meanwhile.
        self.call_in_flight = False

    # -- parking --------------------------------------------------------------------------

    def __enter__(self) -> Borrow:
        self.park()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _current(self, regs: X86Registers) -> int:
        base = regs.k_gs_base if regs.cs & 3 else regs.gs_base
        return self.k.u64(percpu_va(base, self._cur))

    def _eligible(self, regs: X86Registers) -> bool:
        if regs.cs & 3 or not regs.eflags & EFLAGS_IF:
            return False
        if self.k.u32(percpu_va(regs.gs_base, self._preempt)) & 0x7FFFFFFF:
            return False
        task = self._current(regs)
        k = self.k
        stack = k.u64(task + k.member_offset("task_struct", "stack"))
        if not stack + MIN_STACK_LEFT < regs.rsp - RED_ZONE < stack + (16 << 10):
            return False
        # Kernel threads only if they are workqueue workers: borrowing, say, the
        # RCU-tasks kthread and asking it to wait for an RCU-tasks grace period would
        # wait for itself forever (seen on a 1-vCPU guest).
        if k.u32(task + k.member_offset("task_struct", "flags")) & PF_KTHREAD:
            comm = k.read(task + k.member_offset("task_struct", "comm"), 16)
            return comm.startswith(b"kworker/") and not comm.startswith(b"kworker/R-")
        return True

    def park(self, sites: Iterable[str] = BORROW_SITES) -> None:
        """Stop the VM with a task parked at a syscall entry (waits for one)."""
        stub = self.stub
        if stub.running:
            stub.interrupt()
            stub.wait_stop(5)
        addrs: list[int] = []
        for name in sites:
            try:
                addrs.append(place_point(self.k, name).address)
            except SymbolError:
                continue
        if not addrs:
            raise BorrowError("none of the borrow sites exists in this kernel")
        for a in addrs:
            stub.insert_breakpoint(a)
        deadline = time.monotonic() + self.timeout
        try:
            while True:
                stub.cont()
                try:
                    stub.wait_stop(max(0.01, deadline - time.monotonic()))
                except GdbTimeout:
                    stub.interrupt()
                    stub.wait_stop(5)
                    raise BorrowError(
                        f"no task entered a syscall within {self.timeout:.0f} s "
                        "(an idle guest gives no vCPU to borrow)"
                    ) from None
                regs = stub.read_registers()
                if regs.rip in addrs and self._eligible(regs):
                    break
        finally:
            for a in addrs:
                stub.remove_breakpoint(a)
        self._parked = _Parked(regs, self._current(regs), regs.rip, self._stop_tid())

    def _stop_tid(self) -> int:
        stop = self.stub.stop_reply
        if stop is None or stop.thread is None or stop.thread.tid <= 0:
            raise BorrowError("the gdbstub did not say which vCPU stopped")
        return stop.thread.tid

    def release(self) -> None:
        """Put the parked task back exactly as it was (the VM stays stopped)."""
        p, self._parked = self._parked, None
        if p is None or self.call_in_flight:  # see call(): nothing may be undone
            return
        self._restore(p)

    def _restore(self, p: _Parked) -> None:
        """The parked task's own registers back onto the vCPU it now sits on."""
        saved = p.regs
        self.stub.select_thread(p.tid)
        cur = self.stub.read_registers()
        for name in RESTORED:
            setattr(cur, name, getattr(saved, name))
        self.stub.write_registers(cur, use_g=True)

    def select(self) -> None:
        """Point register and memory access at the parked task's vCPU (kernel mode, so
        kernel addresses translate even under PTI)."""
        if self._parked is None:
            raise BorrowError("no task is parked")
        self.stub.select_thread(self._parked.tid)

    @property
    def parked_regs(self) -> X86Registers:
        if self._parked is None:
            raise BorrowError("no task is parked")
        return self._parked.regs

    # -- calls ----------------------------------------------------------------------------

    def call(
        self,
        function: int | str,
        *args: int,
        timeout: float | None = None,
        undo: str | None = None,
    ) -> int:
        """Run ``function(*args)`` (up to six integer arguments) on the parked task and
        return its ``rax``. The VM runs during the call (other vCPUs too: the callee may
        send IPIs); on return the VM is stopped again with the task parked.

        ``undo`` names a kernel function that reverses the call given its result (a
        free for an allocation): used only if this process dies during the call."""
        p = self._parked
        if p is None:
            raise BorrowError("call() needs a parked task (use the Borrow as a context)")
        if len(args) > len(ARG_REGS):
            raise BorrowError("at most six arguments")
        target = self.k.symbols.address(function) if isinstance(function, str) else function
        stub, k = self.stub, self.k
        slot = ((p.regs.rsp - RED_ZONE) & ~0xF) - 8  # rsp % 16 == 8, as at a function entry
        slot_pa = k.walker.translate(slot)
        saved_slot = k.read(slot, 8)
        stub.select_thread(p.tid)
        regs = stub.read_registers()
        for name in RESTORED:
            setattr(regs, name, getattr(p.regs, name))
        for name, value in zip(ARG_REGS, args, strict=False):
            setattr(regs, name, value & ((1 << 64) - 1))
        regs.rsp = slot
        regs.rip = target
        regs.rax = 0
        name = function if isinstance(function, str) else f"{function:#x}"
        if self.journal is not None:
            CallJournal(
                purpose=self.purpose, function=name, task=p.task, pad=self._pad,
                ret_rsp=slot + 8, slot_pa=slot_pa, saved_slot=saved_slot.hex(),
                regs={n: int(getattr(p.regs, n)) for n in RESTORED}, undo=undo,
                pid=os.getpid(),
            ).save(self.journal)  # fmt: skip
        self.write_phys(slot_pa, self._pad.to_bytes(8, "little"))
        stub.insert_breakpoint(self._pad)
        try:
            stub.write_registers(regs, use_g=True)
            self.call_in_flight = True
            result = self._wait_return(slot + 8, p.task, timeout or self.timeout, name)
            self.call_in_flight = False
            p.tid = self._stop_tid()  # the callee may have slept and moved to another vCPU
        finally:
            if not self.call_in_flight:
                stub.remove_breakpoint(self._pad)
                self.write_phys(slot_pa, saved_slot)
        self.calls += 1
        self._restore(p)  # parked again at its site, on whichever vCPU it now is
        if self.journal is not None:
            self.journal.unlink(missing_ok=True)
        return result

    def _wait_return(self, rsp: int, task: int, timeout: float, name: str = "") -> int:
        """Wait for the call to come back. There is no safe way to abort a call the
        guest is running (its return address is our breakpoint), so after ``timeout``
        this only warns and keeps waiting, up to ``HARD_TIMEOUT_FACTOR`` times longer."""
        stub = self.stub
        start = time.monotonic()
        deadline = start + timeout * HARD_TIMEOUT_FACTOR
        warned = False
        while True:
            stub.cont()
            _fault(self.purpose, name)
            while True:
                try:
                    stub.wait_stop(min(1.0, max(0.01, deadline - time.monotonic())))
                    break
                except GdbTimeout:
                    waited = time.monotonic() - start
                    if waited > timeout and not warned:
                        warned = True
                        sys.stderr.write(
                            f"vmshield: a kernel call in the guest has not returned after "
                            f"{waited:.0f} s; still waiting (it cannot be aborted safely)\n"
                        )
                    if time.monotonic() >= deadline:
                        raise BorrowError(
                            f"a borrowed call did not return within {waited:.0f} s; the guest "
                            "is still running it and will crash if it returns after vmshield "
                            "has gone: stop the VM and investigate"
                        ) from None
            regs = stub.read_registers()
            if regs.rip == self._pad and regs.rsp == rsp and self._current(regs) == task:
                return int(regs.rax)


def _returned_vcpu(stub: GdbStub, k: Kernel, j: CallJournal) -> tuple[int, X86Registers] | None:
    """The vCPU (thread id) sitting on the journaled call's return, if any."""
    cur = current_task_offset(k)
    for tid in stub.threads():
        stub.select_thread(tid)
        regs = stub.read_registers()
        if regs.rip != j.pad or regs.rsp != j.ret_rsp:
            continue
        base = regs.k_gs_base if regs.cs & 3 else regs.gs_base
        if k.u64(percpu_va(base, cur)) == j.task:
            return tid, regs
    return None


def finish_orphaned_call(
    stub: GdbStub, k: Kernel, write_phys: WritePhys, path: Path, timeout: float = 300.0
) -> tuple[CallJournal, int] | None:
    """Complete a borrowed call whose caller died (see the module docstring).

    The VM must be stopped (a fresh gdbstub session). Waits, with the VM running, until
    the journaled call returns to its breakpoint, then puts the task back exactly as it
    was parked and the stack slot as it was. Returns the journal and the call's result,
    or None when no call was in flight. A journal of a process that still lives is
    refused (that process is still handling its call).
    """
    j = CallJournal.load(path)
    if j is None:
        return None
    if j.pid != os.getpid():
        with contextlib.suppress(ProcessLookupError):
            os.kill(j.pid, 0)
            raise BorrowError(f"process {j.pid} is still running a borrowed call in this VM")
    stub.insert_breakpoint(j.pad)
    try:
        deadline = time.monotonic() + timeout
        found = _returned_vcpu(stub, k, j)
        while found is None:
            if time.monotonic() > deadline:
                raise BorrowError(
                    f"the orphaned call to {j.function} did not return within {timeout:.0f} s"
                )
            stub.cont()
            try:
                stub.wait_stop(max(0.01, deadline - time.monotonic()))
            except GdbTimeout:
                stub.interrupt()
                stub.wait_stop(5)
            found = _returned_vcpu(stub, k, j)
        tid, regs = found
        result = int(regs.rax)
        for name in RESTORED:
            setattr(regs, name, j.regs[name])
        stub.select_thread(tid)
        stub.write_registers(regs, use_g=True)
        write_phys(j.slot_pa, bytes.fromhex(j.saved_slot))
    finally:
        with contextlib.suppress(HypervisorError):
            stub.remove_breakpoint(j.pad)
    path.unlink(missing_ok=True)
    if j.undo and result >> 63:  # an allocation nobody recorded: give it back
        with Borrow(stub, k, write_phys, purpose="recovery") as b:
            b.call(j.undo, result)
    return j, result


def recover_orphaned_call(t: Target, k: Kernel) -> CallJournal | None:
    """Finish a call a killed vmshield left running in ``t`` (see
    :func:`finish_orphaned_call`) and let the VM run on; the journal of that call, or
    None when there was none."""
    stub = t.gdbstub()
    try:
        done = finish_orphaned_call(stub, k, t.mem.write, journal_path(t))
        stub.detach()
    finally:
        stub.close()
    return done[0] if done else None


@contextlib.contextmanager
def borrowed(t: Target, k: Kernel, purpose: str, timeout: float = 30.0) -> Iterator[Borrow]:
    """One gdbstub session with a parked task for ``purpose``: the pattern every
    in-guest call uses. An orphaned call of a dead monitor is finished first. On a
    normal exit the task is put back and the VM runs on with no debugger attached; on
    an error the VM is detached too (running), unless a call is still in flight, whose
    journal then lets ``vmshield detach`` finish it."""
    stub = t.gdbstub()
    b: Borrow | None = None
    try:
        finish_orphaned_call(stub, k, t.mem.write, journal_path(t))
        b = Borrow(stub, k, t.mem.write, timeout, journal=journal_path(t), purpose=purpose)
        with b:
            yield b
        stub.detach()
    except BaseException:
        if stub.connected and (b is None or not b.call_in_flight):
            with contextlib.suppress(HypervisorError):
                if stub.running:
                    stub.interrupt()
                    stub.wait_stop(5)
                stub.detach()
        raise
    finally:
        stub.close()
