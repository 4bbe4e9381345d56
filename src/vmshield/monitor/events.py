"""The event schema (versioned): what the agent records at a monitoring point.

One JSON object per line. ``schema`` names the version; fields are only ever added
within a version. ``fields`` holds the behaviour's data (catalog-specific, documented in
the catalog); a field that could not be decoded is listed in ``decode_errors`` instead of
ending the monitor.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

SCHEMA = "vmshield.event/1"


class ProcessContext(BaseModel):
    """Who did it: the task running on the vCPU when the point fired."""

    pid: int
    tgid: int
    ppid: int
    uid: int
    euid: int
    gid: int
    comm: str
    task: str  # struct task_struct * in hex


class PointInfo(BaseModel):
    """Which monitoring point fired."""

    symbol: str
    address: str
    kind: str  # "kernel-function"
    engine: str  # "exit"
    cpu: int


class Event(BaseModel):
    """One behaviour seen at a monitoring point (or a security-space alert): who did
    what with which arguments, which point fired, and the action taken."""

    schema_: str = Field(default=SCHEMA, alias="schema")
    time: float
    vm: str
    request: str
    object: str
    action: str  # the action taken: log, deny, kill, pause, dump
    process: ProcessContext | None
    fields: dict[str, Any]
    point: PointInfo
    decode_errors: list[str] = Field(default_factory=list)
    detail: dict[str, Any] = Field(default_factory=dict)  # action results (dump path, ...)

    model_config = {"populate_by_name": True}

    def to_json(self) -> str:
        """The event as one JSON line (``schema`` spelled as such)."""
        return self.model_dump_json(by_alias=True)
