"""An attached guest as one object: ``open_vm(target) -> VM``.

Why: the CLI, a daemon, the benchmarks, the tests and users' scripts all start the same
way (find the QEMU or the dump, map its memory, build the kernel model from raw memory
with the per-build symbol cache, store what was learned on the way out). :class:`VM`
does that once and releases what it holds when closed.

    with vmshield.open_vm("lab1") as vm:
        for task in vm.ps():
            print(task.pid, task.name)
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from vmshield.errors import GuestFormatError, VmshieldError
from vmshield.guest.kernel import Kernel
from vmshield.guest.modules import ModuleInfo
from vmshield.guest.modules import modules as walk_modules
from vmshield.guest.paging import ReadPhys
from vmshield.guest.symcache import SymbolCache
from vmshield.guest.tasks import TaskInfo, tasks
from vmshield.hv.target import Target
from vmshield.paths import cache_dir, run_dir


@dataclass(frozen=True)
class Symbol:
    """One kernel symbol, as a line of ``/proc/kallsyms`` shows it."""

    address: int
    type: str
    name: str


class VM:
    """A guest vmshield is attached to: a live QEMU (``target``) or a memory dump
    (``target`` is None), and the kernel model built from its memory."""

    def __init__(
        self, name: str, target: Target | None, kernel: Kernel, close: Callable[[], None]
    ) -> None:
        self.name = name
        self.target = target
        self.kernel = kernel
        self._close: Callable[[], None] | None = close

    # -- lifetime -----------------------------------------------------------------------

    def close(self) -> None:
        """Store what was learned about this kernel build; release QMP and memory."""
        close, self._close = self._close, None
        if close is not None:
            close()

    def __enter__(self) -> VM:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def live(self) -> bool:
        """A running QEMU, not a dump file."""
        return self.target is not None

    def require_live(self, what: str) -> Target:
        """The QEMU behind this VM, or an error saying ``what`` needs a live VM."""
        if self.target is None:
            raise VmshieldError(f"{what} needs a running VM, not a dump file ({self.name})")
        return self.target

    # -- views of the guest -------------------------------------------------------------

    @contextmanager
    def paused(self) -> Iterator[None]:
        """The VM stopped for the block (a consistent view), running again afterwards
        if it ran before; a dump or an already paused VM is left as it is."""
        t = self.target
        was_running = t is not None and t.qmp.running()
        if t is not None and was_running:
            t.qmp.stop()
        try:
            yield
        finally:
            if t is not None and was_running:
                t.qmp.cont()

    def ps(self) -> list[TaskInfo]:
        """Every task, walked from ``init_task`` with the VM paused."""
        with self.paused():
            return tasks(self.kernel)

    def modules(self) -> list[ModuleInfo]:
        """Loaded kernel modules, from the kernel's module list."""
        return walk_modules(self.kernel)

    def symbols(self, pattern: str | None = None) -> list[Symbol]:
        """Kernel symbols (all, or those whose name matches the regular expression)."""
        try:
            pat = re.compile(pattern) if pattern else None
        except re.error as e:
            raise VmshieldError(f"bad regex {pattern!r}: {e}") from None
        s = self.kernel.symbols
        return [
            Symbol(a, ty, n)
            for n, a, ty in zip(s.names, s.addrs, s.types, strict=True)
            if pat is None or pat.search(n)
        ]

    def state_path(self, kind: str) -> Path:
        """Where vmshield records what it changed in this VM (``armed``, ``space``,
        ``borrow``), so that ``detach`` can undo it after a crash."""
        return self.require_live("state").gdb_path().with_suffix(f".{kind}.json")


def open_vm(
    target: str,
    *,
    symbols: str | Path | None = None,
    cache: SymbolCache | None = None,
    notes: Callable[[str], None] | None = None,
) -> VM:
    """Attach to ``target``: a lab VM name, a QEMU QMP socket path, or a QEMU ELF dump.

    Nothing in the guest changes: memory is read through QEMU's shared RAM (or its
    process memory) and the kernel is found from its page tables and kallsyms.
    ``symbols``: a System.map, a /proc/kallsyms copy or a Volatility ISF to take the
    symbols from instead (checked against memory), or ``guest-agent[:SOCKET]`` for the
    guest's own /proc/kallsyms through its QEMU guest agent. Without it, a kernel whose
    kallsyms cannot be decoded falls back to the guest agent of a live VM when it has
    one, and says so through ``notes``.
    """
    cache = cache or SymbolCache(cache_dir() / "symtab")
    note = notes or (lambda _text: None)

    def attach(read: ReadPhys, cr3: int, cr4: int) -> Kernel:
        from vmshield.guest import transfer  # the guest agent client (its own module)

        spec = str(symbols) if symbols is not None else ""
        if spec == "guest-agent" or spec.startswith("guest-agent:"):
            return transfer.attach_via_agent(
                read, cr3, cr4, transfer.agent_socket(target, run_dir(), spec)
            )
        if symbols is not None:
            return Kernel.attach_external(read, cr3, cr4, Path(symbols))
        try:
            return Kernel.attach(read, cr3, cr4, cache)
        except GuestFormatError as e:
            # The fallback of the method: the guest's own table, through its agent.
            sock = transfer.agent_socket(target, run_dir(), "guest-agent")
            if Path(target).is_file() or not sock.exists():
                raise
            note(f"note: {e}; asking the guest agent at {sock} for /proc/kallsyms")
            try:
                return transfer.attach_via_agent(read, cr3, cr4, sock)
            except VmshieldError as e2:
                raise GuestFormatError(f"{e}; and the guest agent: {e2}") from None

    if Path(target).is_file():
        from vmshield.hv.dumpfile import GuestDump

        dump = GuestDump(Path(target))
        try:
            if not dump.cpus:
                raise VmshieldError(f"{target}: no vCPU state in the dump (QEMU note)")
            dcpu = dump.cpus[0]
            k = attach(dump.read, dcpu.cr3, dcpu.cr4)
        except BaseException:
            dump.close()
            raise
        return VM(target, None, k, dump.close)
    t = Target(target).open()
    try:
        cpu = t.cpus()[0]
        k = attach(t.mem.read, cpu.cr3, cpu.cr4)
    except BaseException:
        t.close()
        raise

    def close() -> None:
        try:
            # Only a build from the guest's own kallsyms is filed: one from a symbols
            # file or the guest agent (key "external-...") is never looked up again.
            if k.build.dirty and k.symbol_source == "kallsyms":
                cache.store(k.build)
        finally:
            t.close()

    return VM(target, t, k, close)
