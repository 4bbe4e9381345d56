"""Host processes as vmshield checks them before it trusts or signals a pid.

A pid is only a number: the process vmshield started may have exited and the number
been given to another process (of this user, or of root). So a pid read from a pid file
or from a socket's peer is used only after ``/proc/PID`` shows it is still the process
meant: a lab VM's QEMU names the VM and its pid file on its command line; a QEMU whose
memory vmshield reads is a ``qemu-system-*`` binary that maps the guest's RAM.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path


def cmdline(pid: int) -> list[str] | None:
    """The argument vector of a live process (None if it is gone or unreadable)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    if not raw:
        return None  # a zombie or a kernel thread
    return raw.rstrip(b"\0").decode("utf-8", "surrogateescape").split("\0")


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    if pid <= 0:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[:1] != ["Z"]


def has_args(argv: list[str], *pairs: tuple[str, str]) -> bool:
    """Whether ``argv`` holds each ``option value`` pair as two consecutive arguments."""
    found = set(itertools.pairwise(argv))
    return all(p in found for p in pairs)


def is_lab_qemu(pid: int, vm_name: str, pid_file: Path) -> bool:
    """Whether ``pid`` is still the QEMU vmshield started for this lab VM: its command
    line names the VM and the pid file of this run directory (two run directories may
    hold VMs of the same name)."""
    argv = cmdline(pid)
    if argv is None or not alive(pid):
        return False
    return has_args(argv, ("-name", f"vmshield-{vm_name}"), ("-pidfile", str(pid_file)))


def exe_name(pid: int) -> str | None:
    """Base name of the process's executable (its ``/proc/PID/exe``; else argv[0])."""
    try:
        return os.path.basename(os.readlink(f"/proc/{pid}/exe")).removesuffix(" (deleted)")
    except OSError:
        argv = cmdline(pid)
        return os.path.basename(argv[0]) if argv else None


def is_qemu_binary(pid: int) -> bool:
    name = exe_name(pid)
    return name is not None and name.startswith("qemu-system-")


def mappings(pid: int) -> list[tuple[int, int, str]] | None:
    """(start, end, path) of each mapping in ``/proc/PID/maps`` (None: unreadable)."""
    try:
        text = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return None
    out = []
    for line in text.splitlines():
        fields = line.split(maxsplit=5)
        if not fields or "-" not in fields[0]:
            continue
        lo, _, hi = fields[0].partition("-")
        try:
            out.append((int(lo, 16), int(hi, 16), fields[5] if len(fields) > 5 else ""))
        except ValueError:
            continue
    return out


def maps_cover(pid: int, spans: list[tuple[int, int]]) -> bool:
    """Whether every host-virtual span ``(address, size)`` lies inside the process's
    mappings (adjacent mappings count as one: QEMU may split a RAM block's mapping)."""
    maps = mappings(pid)
    if not maps:
        return False
    for addr, size in spans:
        end, pos = addr + size, addr
        for lo, hi, _ in sorted(maps):
            if lo <= pos < hi:
                pos = hi
                if pos >= end:
                    break
        if pos < end:
            return False
    return True


def pids() -> list[int]:
    """Every pid in ``/proc``."""
    try:
        return sorted(int(e) for e in os.listdir("/proc") if e.isdigit())
    except OSError:
        return []
