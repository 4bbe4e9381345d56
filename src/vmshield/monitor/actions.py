"""Host-side actions both engines carry out the same way (through QMP)."""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmshield.errors import VmshieldError
from vmshield.hv.target import Target


class ActionRefused(VmshieldError):
    """An action was not carried out by policy (rate limit, no room): the event still
    goes out and says why."""


DUMP_MARGIN = 16 << 20  # ELF headers and notes on top of guest RAM


@dataclass
class DumpPolicy:
    """Where dumps go and how often: at most one dump per ``min_interval`` seconds for
    each request, and none when the directory lacks room for one.

    Why: a dump writes all guest RAM; a request that matches in a loop would otherwise
    fill the host's disk and stall the VM for each dump.
    """

    directory: Path
    min_interval: float = 10.0
    _last: dict[str, float] = field(default_factory=dict)

    def check(self, t: Target) -> None:
        """Before arming: the directory exists, is writable and holds one dump now."""
        d = self.directory
        if not d.is_dir():
            raise VmshieldError(f"--dump-dir {d}: not a directory")
        if not os.access(d, os.W_OK | os.X_OK):
            raise VmshieldError(f"--dump-dir {d}: not writable")
        self._room(t)

    def _room(self, t: Target) -> None:
        need = guest_ram_bytes(t) + DUMP_MARGIN
        free = shutil.disk_usage(self.directory).free
        if free < need:
            raise ActionRefused(
                f"{self.directory} has {free >> 20} MiB free, a dump of this VM needs "
                f"about {need >> 20} MiB"
            )

    def dump(self, t: Target, request: str) -> dict[str, Any]:
        now = time.monotonic()
        last = self._last.get(request)
        if last is not None and now - last < self.min_interval:
            raise ActionRefused(
                f"at most one dump per {self.min_interval:g} s for request {request} "
                f"(the last was {now - last:.1f} s ago)"
            )
        self._room(t)
        self._last[request] = now
        return dump_memory(t, self.directory)


def guest_ram_bytes(t: Target) -> int:
    """The VM's RAM size (QMP ``query-memory-size-summary``), QMP released again."""
    try:
        got = t.qmp.execute("query-memory-size-summary")
    finally:
        t.qmp.close()
    return int(got.get("base-memory", 0)) + int(got.get("plugged-memory", 0) or 0)


def dump_memory(t: Target, dump_dir: Path) -> dict[str, Any]:
    """A QEMU ELF dump of the guest (``vmshield ps DUMP`` reads it back); the guest goes
    on afterwards. QMP is closed again so that other tools may use it meanwhile."""
    name = f"vmshield-{Path(t.name).name}-{int(time.time() * 1000)}.elf"
    path = (dump_dir / name).resolve()
    try:
        t.qmp.execute("dump-guest-memory", paging=False, protocol=f"file:{path}")
    finally:
        t.qmp.close()
    return {"dump": str(path)}


def pause_vm(t: Target) -> None:
    """Stop the VM for forensics (``vmshield resume`` continues it)."""
    try:
        t.qmp.stop()
    finally:
        t.qmp.close()


def vm_status(t: Target) -> str:
    """QEMU's run state (see :meth:`vmshield.hv.qmp.Qmp.status`); QMP is released again
    so that the operator's ``vmshield resume`` can connect."""
    try:
        return t.qmp.status()
    finally:
        t.qmp.close()
