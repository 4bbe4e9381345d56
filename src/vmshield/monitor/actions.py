"""Host-side actions both engines carry out the same way (through QMP)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from vmshield.hv.target import Target


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
