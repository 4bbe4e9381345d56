"""What the agent sees at a monitoring point: registers, the current task, guest memory.

Arguments follow the x86-64 SysV calling convention (rdi, rsi, rdx, rcx, r8, r9) because
points sit on a function's first instruction. Kernel structures are read through the
kernel's page tables with BTF offsets; user memory through the current CR3. All reads
are bounded and every failure becomes a decode error on the event, not a dead monitor.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from vmshield.errors import VmshieldError
from vmshield.guest.kernel import Kernel
from vmshield.guest.paging import PageWalker
from vmshield.guest.tasks import TaskReader
from vmshield.hv.gdbpackets import X86Registers
from vmshield.monitor.events import ProcessContext

ARG_REGS = ("rdi", "rsi", "rdx", "rcx", "r8", "r9")
MAX_PATH_DEPTH = 64
MAX_NAME = 255
AF_INET, AF_INET6, AF_UNIX = 2, 10, 1


@dataclass
class HitContext:
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
        """``current``: the per-cpu current task, found through the vCPU's GS base."""
        if self._current is None:
            k = self.kernel
            var = _current_var(k)
            self._current = k.u64(self.regs.gs_base + var)
        return self._current

    def process(self) -> ProcessContext | None:
        try:
            t = self.tasks.info(self.current)
        except VmshieldError as e:
            self.errors.append(f"process: {e}")
            return None
        return ProcessContext(
            pid=t.pid, tgid=t.tgid, ppid=t.ppid, uid=t.uid, euid=t.euid, gid=t.gid,
            comm=t.comm, task=f"{t.address:#x}",
        )  # fmt: skip

    # -- kernel objects -------------------------------------------------------------

    def off(self, struct_name: str, path: str) -> int:
        return self.kernel.member_offset(struct_name, path)

    def u64(self, va: int) -> int:
        return self.kernel.u64(va)

    def dentry_name(self, dentry: int) -> str:
        name_ptr = self.u64(dentry + self.off("dentry", "d_name.name"))
        return self.kernel.cstring(name_ptr, MAX_NAME + 1)

    def path_of(self, path_va: int) -> str:
        """Full path of a ``struct path *`` across mounts, like the kernel's d_path()."""
        mnt = self.u64(path_va + self.off("path", "mnt"))
        dentry = self.u64(path_va + self.off("path", "dentry"))
        return self.dentry_path(mnt, dentry)

    def dentry_path(self, mnt: int, dentry: int) -> str:
        off_parent = self.off("dentry", "d_parent")
        off_root = self.off("vfsmount", "mnt_root")
        off_mnt = self.off("mount", "mnt")
        off_mp = self.off("mount", "mnt_mountpoint")
        off_mparent = self.off("mount", "mnt_parent")
        parts: list[str] = []
        for _ in range(MAX_PATH_DEPTH * 4):
            root = self.u64(mnt + off_root) if mnt else 0
            if dentry == root:
                mount = mnt - off_mnt
                parent = self.u64(mount + off_mparent)
                if not mnt or parent == mount:
                    break
                dentry = self.u64(mount + off_mp)
                mnt = parent + off_mnt
                continue
            parent_dentry = self.u64(dentry + off_parent)
            if parent_dentry == dentry:
                break
            parts.append(self.dentry_name(dentry))
            dentry = parent_dentry
            if len(parts) > MAX_PATH_DEPTH:
                self.errors.append("path: deeper than the walk bound")
                break
        return "/" + "/".join(reversed(parts))

    def file_path(self, file: int) -> str:
        return self.path_of(file + self.off("file", "f_path"))

    def sockaddr(self, va: int, length: int) -> dict[str, object]:
        """Family, address and port of a ``struct sockaddr *`` (kernel copy)."""
        raw = self.kernel.read(va, max(2, min(length, 28)))
        family = int.from_bytes(raw[:2], "little")
        out: dict[str, object] = {"family": _family(family)}
        if family == AF_INET and len(raw) >= 8:
            out["port"] = struct.unpack(">H", raw[2:4])[0]
            out["address"] = ".".join(str(b) for b in raw[4:8])
        elif family == AF_INET6 and len(raw) >= 24:
            import ipaddress

            out["port"] = struct.unpack(">H", raw[2:4])[0]
            out["address"] = str(ipaddress.IPv6Address(raw[8:24]))
        elif family == AF_UNIX:
            out["address"] = raw[2:].split(b"\0", 1)[0].decode(errors="backslashreplace")
        return out

    def user_walker(self) -> PageWalker:
        return PageWalker(
            self.kernel.walker.read_phys,
            self.regs.cr3 & ~(1 << 12),
            bool(self.regs.cr4 & (1 << 12)),
        )


def _family(f: int) -> str:
    return {AF_INET: "inet", AF_INET6: "inet6", AF_UNIX: "unix"}.get(f, str(f))


def _current_var(k: Kernel) -> int:
    if "current_task" in k.symbols:
        return k.symbols.address("current_task")
    return k.symbols.address("pcpu_hot") + k.member_offset("pcpu_hot", "current_task")
