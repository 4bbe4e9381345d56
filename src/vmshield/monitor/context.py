"""The exit engine's view of a stop: the decoders' :class:`PointContext` plus who is
running, as an event's :class:`ProcessContext` (the event schema lives in ``monitor``,
so this part does too)."""

from __future__ import annotations

from dataclasses import dataclass

from vmshield.errors import VmshieldError
from vmshield.monitor.events import ProcessContext
from vmshield.objects.context import PointContext


@dataclass
class HitContext(PointContext):
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
