"""A target VM: any QEMU reachable by its QMP socket, or a lab VM by name.

Owns the QMP connection and the guest-memory mapping of one attach. Guest RAM comes
from the shared memory backend when QEMU has one (zero round trips), else from QEMU's
own memory through ``/proc/PID/mem`` at the host addresses ``gpa2hva`` gives.

That pid must be QEMU's own. The QMP socket's peer is not always QEMU: behind a QMP
proxy (libvirt's ``virt-qemu-qmp-proxy``) it is the proxy, whose memory is not the
guest's. So the pid is accepted only for a ``qemu-system-*`` process that maps every
RAM host address QEMU reported and whose memory holds the same bytes QEMU shows
through ``xp`` at sample addresses; if the peer is not that, every readable QEMU
process is tried the same way, and when none (or more than one) qualifies the attach
fails with one line saying so.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from vmshield.errors import HypervisorError, VmshieldError
from vmshield.hv.gdbstub import GdbStub
from vmshield.hv.libvirt import PREFIX as LIBVIRT
from vmshield.hv.libvirt import Domain, LibvirtQmp
from vmshield.hv.memmap import RamRange
from vmshield.hv.memory import GuestMemory
from vmshield.hv.qmp import Qmp, socket_peer_pid
from vmshield.paths import private_dir, run_dir
from vmshield.procs import exe_name, is_qemu_binary, maps_cover, pids

_REG = re.compile(r"\b(RIP|RSP|CR0|CR2|CR3|CR4|EFER)=([0-9a-f]+)")
_SEG = re.compile(r"^(CS|SS|DS|ES|FS|GS) =([0-9a-f]+) ([0-9a-f]+)", re.M)
_TABLE = re.compile(r"^(GDT|IDT)=\s+([0-9a-f]+) ([0-9a-f]+)", re.M)


@dataclass(frozen=True)
class CpuState:
    """Control state of one vCPU, as QMP's ``info registers`` shows it."""

    index: int
    rip: int
    rsp: int
    cr0: int
    cr3: int
    cr4: int
    efer: int
    gs_base: int
    cs: int
    idt_base: int
    idt_limit: int
    gdt_base: int
    gdt_limit: int

    @property
    def la57(self) -> bool:
        return bool(self.cr4 & (1 << 12))

    @property
    def user_mode(self) -> bool:
        return self.cs & 3 == 3


def parse_info_registers(text: str) -> list[CpuState]:
    """Per-vCPU state from ``info registers`` (all CPUs: ``info registers -a``)."""
    blocks = re.split(r"^CPU#(\d{1,6})", text, flags=re.M)
    cpus = []
    pairs = list(zip(blocks[1::2], blocks[2::2], strict=False)) or [("0", text)]
    for idx, body in pairs:
        regs = {k: int(v, 16) for k, v in _REG.findall(body)}
        segs = {m[0]: (int(m[1], 16), int(m[2], 16)) for m in _SEG.findall(body)}
        tables = {m[0]: (int(m[1], 16), int(m[2], 16)) for m in _TABLE.findall(body)}
        missing = {"RIP", "CR3", "CR4"} - regs.keys()
        if missing or "GS" not in segs:
            raise HypervisorError(f"info registers lacks {sorted(missing) or ['GS']}")
        cpus.append(
            CpuState(
                index=int(idx),
                rip=regs["RIP"],
                rsp=regs.get("RSP", 0),
                cr0=regs.get("CR0", 0),
                cr3=regs["CR3"],
                cr4=regs["CR4"],
                efer=regs.get("EFER", 0),
                gs_base=segs["GS"][1],
                cs=segs.get("CS", (0, 0))[0],
                idt_base=tables.get("IDT", (0, 0))[0],
                idt_limit=tables.get("IDT", (0, 0))[1],
                gdt_base=tables.get("GDT", (0, 0))[0],
                gdt_limit=tables.get("GDT", (0, 0))[1],
            )
        )
    return cpus


def resolve_qmp(target: str) -> Path:
    """A QMP socket path from a lab VM name or a path."""
    if "/" in target:
        p = Path(target)
        if not p.exists():
            raise HypervisorError(f"no QMP socket at {p}")
        return p
    p = private_dir() / target / "qmp.sock"  # a lab VM's socket only from a private folder
    if not p.exists():
        raise VmshieldError(
            f"unknown VM {target!r}: no lab VM of that name is running "
            "(vmshield vm list), and it is not a QMP socket path"
        )
    return p


class Target:
    """One attached QEMU: QMP plus guest memory."""

    def __init__(self, target: str) -> None:
        self.name = target
        self.domain: Domain | None = None
        if target.startswith(LIBVIRT):  # a domain libvirt runs: QMP through libvirt
            self.domain = Domain(target[len(LIBVIRT) :])
            self.qmp: Qmp = LibvirtQmp(self.domain)
            self.qmp_path = Path(target)
        else:
            self.qmp_path = resolve_qmp(target)
            self.qmp = Qmp(self.qmp_path)
        self.memory: GuestMemory | None = None
        self.memory_kind = ""

    def open(self) -> Target:
        self.qmp.connect()
        try:
            ranges = self.qmp.ram_ranges()
            shared = self.qmp.shared_backends()
            if shared and all(r.block in shared for r in ranges):
                self.memory = GuestMemory.from_shared(ranges, shared)
                self.memory_kind = "shared"
            else:
                hvas = [self.qmp.gpa_to_hva(r.start) for r in ranges]
                # QEMU's pid: from libvirt for its domains (never from a socket peer)
                pid = (
                    self.domain.pid()
                    if self.domain
                    else qemu_pid(self.qmp, self.qmp_path, ranges, hvas)
                )
                self.memory = GuestMemory.from_process(pid, ranges, hvas)
                self.memory_kind = "process"
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        if self.memory is not None:
            self.memory.close()
            self.memory = None
        self.qmp.close()
        if self.domain is not None:
            self.domain.close()
            self.domain = None

    def __enter__(self) -> Target:
        return self.open()

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def mem(self) -> GuestMemory:
        if self.memory is None:
            raise HypervisorError("target is not open")
        return self.memory

    def cpus(self) -> list[CpuState]:
        return parse_info_registers(self.qmp.hmp("info registers -a"))

    def gdb_path(self) -> Path:
        """The gdbstub socket of this target: a lab VM's own, or one vmshield opens through
        QMP (``gdbserver``) for a QEMU started without ``-gdb``."""
        if self.domain is not None:  # a directory libvirt's QEMU user can write
            path = self.domain.directory() / "vmshield-gdb.sock"
            if not path.exists():
                self.qmp.start_gdbserver(path)
            if not path.exists():
                raise HypervisorError(f"QEMU did not open a gdbstub at {path}")
            return path
        lab = self.qmp_path.parent / "gdb.sock"
        if self.qmp_path.name == "qmp.sock" and lab.exists():
            return lab
        tag = hashlib.sha256(str(self.qmp_path.resolve()).encode()).hexdigest()[:16]
        private_dir()
        path = private_dir(run_dir() / "attach") / f"{tag}.gdb.sock"
        if not path.exists():
            self.qmp.start_gdbserver(path)
        if not path.exists():
            raise HypervisorError(f"QEMU did not open a gdbstub at {path}")
        return path

    def gdbstub(self, timeout: float = 5.0) -> GdbStub:
        """A connected gdbstub client (the VM stops while it is connected)."""
        stub = GdbStub()
        stub.connect(str(self.gdb_path()), timeout=timeout)
        return stub


SAMPLES = 16
SAMPLE_BYTES = 16


def _sample_addresses(ranges: list[RamRange]) -> list[int]:
    """Guest-physical addresses spread over RAM, and some where Linux keeps its image
    (16 MiB up), so that most samples hold non-zero bytes."""
    total = sum(r.size for r in ranges)
    out: list[int] = []
    for i in range(SAMPLES):
        pos = (total * i // SAMPLES) & ~0xFFF
        for r in ranges:
            if pos < r.size:
                out.append(r.start + pos + 0x40 * i)
                break
            pos -= r.size
    for gpa in range(0x100_0000, 0x110_0000, 0x2_0000):
        if any(r.start <= gpa and gpa + SAMPLE_BYTES <= r.end for r in ranges):
            out.append(gpa + 0x80)
    return out


def _xp(qmp: Qmp, gpa: int) -> bytes | None:
    """SAMPLE_BYTES of guest-physical memory as QEMU itself shows them (HMP ``xp``)."""
    text = qmp.hmp(f"xp /{SAMPLE_BYTES // 8}xg {gpa:#x}")
    words = re.findall(r"0x([0-9a-f]{16})\b", text.partition(":")[2])
    if len(words) != SAMPLE_BYTES // 8:
        return None
    return b"".join(int(w, 16).to_bytes(8, "little") for w in words)


def _holds_guest_ram(
    qmp: Qmp, pid: int, ranges: list[RamRange], hvas: list[int], tries: int = 3
) -> bool:
    """Whether ``/proc/PID/mem`` at QEMU's RAM host addresses holds what QEMU shows at
    the same guest-physical addresses (a sample may change under a running guest: each
    is retried a few times)."""
    try:
        fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    except OSError:
        return False
    try:
        for gpa in _sample_addresses(ranges):
            r, hva = next(
                (r, h) for r, h in zip(ranges, hvas, strict=True) if r.start <= gpa < r.end
            )
            for _ in range(tries):
                want = _xp(qmp, gpa)
                try:
                    got = os.pread(fd, SAMPLE_BYTES, hva + gpa - r.start)
                except OSError:
                    return False
                if want is not None and want == got:
                    break
            else:
                return False
    finally:
        os.close(fd)
    return True


def qemu_pid(qmp: Qmp, qmp_path: Path, ranges: list[RamRange], hvas: list[int]) -> int:
    """The pid of the QEMU process that holds this guest's RAM (see the module doc)."""
    spans = [(h, r.size) for r, h in zip(ranges, hvas, strict=True)]

    def holds(pid: int) -> bool:
        return (
            pid != os.getpid()
            and is_qemu_binary(pid)
            and maps_cover(pid, spans)
            and _holds_guest_ram(qmp, pid, ranges, hvas)
        )

    peer = socket_peer_pid(qmp_path)
    if holds(peer):
        return peer
    found = [p for p in pids() if p != peer and holds(p)]
    if len(found) == 1:
        return found[0]
    what = exe_name(peer) or "unknown"
    if not found:
        raise HypervisorError(
            f"cannot find the QEMU process behind {qmp_path}: its peer is pid {peer} "
            f"({what}), not a QEMU holding this guest's RAM (a QMP proxy?), and no other "
            "QEMU process readable here holds it; run as QEMU's user or root, or give "
            "QEMU a shared memory backend (memory-backend-file,share=on)"
        )
    raise HypervisorError(
        f"several QEMU processes ({', '.join(map(str, found))}) hold the RAM behind "
        f"{qmp_path} at the same host addresses: cannot tell which is this guest's"
    )
