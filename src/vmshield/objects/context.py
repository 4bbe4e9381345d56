"""What the exit engine's decoders see at a monitoring point: registers, the current
task, guest memory.

Arguments follow the x86-64 SysV calling convention (rdi, rsi, rdx, rcx, r8, r9) because
points sit on a function's first instruction. Kernel structures are read through the
kernel's page tables with BTF offsets; user memory through the current CR3. All reads
are bounded and every failure becomes a decode error on the event, not a dead monitor.
The engine's own view (who is running, as an event's process) extends this in
:mod:`vmshield.monitor.context`; decoders need only what is here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vmshield.guest import files
from vmshield.guest.kernel import Kernel
from vmshield.guest.sockets import decode_sockaddr
from vmshield.guest.tasks import TaskReader, percpu_va
from vmshield.hv.gdbpackets import X86Registers

ARG_REGS = ("rdi", "rsi", "rdx", "rcx", "r8", "r9")


@dataclass
class PointContext:
    kernel: Kernel
    tasks: TaskReader
    regs: X86Registers
    cpu: int
    errors: list[str] = field(default_factory=list)
    _current: int | None = None

    def arg(self, n: int) -> int:
        return int(getattr(self.regs, ARG_REGS[n]))

    def sarg(self, n: int) -> int:
        v = self.arg(n)
        return v - (1 << 64) if v >> 63 else v

    @property
    def current(self) -> int:
        """``current``: the per-cpu current task, found through the vCPU's GS base (in
        user mode the kernel's per-cpu base waits in KERNEL_GS_BASE until swapgs)."""
        if self._current is None:
            k = self.kernel
            var = self.tasks.current_offset
            user = self.regs.cs & 3 == 3
            base = self.regs.k_gs_base if user else self.regs.gs_base
            self._current = k.u64(percpu_va(base, var))
        return self._current

    # -- kernel objects -------------------------------------------------------------

    def off(self, struct_name: str, path: str) -> int:
        return self.kernel.member_offset(struct_name, path)

    def u64(self, va: int) -> int:
        return self.kernel.u64(va)

    def dentry_name(self, dentry: int) -> str:
        return files.dentry_name(self.kernel, dentry)

    def path_of(self, path_va: int) -> str:
        """Full path of a ``struct path *`` across mounts, like the kernel's d_path()."""
        return files.path_of(self.kernel, path_va)

    def file_path(self, file: int) -> str:
        return files.file_path(self.kernel, file)

    def sockaddr(self, va: int, length: int) -> dict[str, object]:
        """Family, address and port of a ``struct sockaddr *`` (kernel copy)."""
        return decode_sockaddr(self.kernel.read(va, max(2, min(length, 28))))
