"""The event schema (versioned): what the agent records at a monitoring point.

One JSON object per line. ``schema`` names the version; fields are only ever added
within a version. ``fields`` holds the behaviour's data (catalog-specific, documented in
the catalog); a field that could not be decoded is listed in ``decode_errors`` instead of
ending the monitor.
"""

from __future__ import annotations

from collections.abc import Callable
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


_EVENT_FIELDS = frozenset(Event.model_fields)
_ALL_SET = set(_EVENT_FIELDS)  # shared: pydantic only ever adds field names to it
_new_event = Event.__new__
_TEMPLATE: dict[str, Any] = {**dict.fromkeys(Event.model_fields), "schema_": SCHEMA}
# __dict__ and the slots pydantic keeps beside it, set through their descriptors directly
# (a third of the cost of object.__setattr__ by name, measured).
_set_dict = BaseModel.__dict__["__dict__"].__set__
_set_fields_set = BaseModel.__dict__["__pydantic_fields_set__"].__set__
_set_extra = BaseModel.__dict__["__pydantic_extra__"].__set__
_set_private = BaseModel.__dict__["__pydantic_private__"].__set__


TrustedMaker = Callable[[float, ProcessContext | None, dict[str, Any], list[str], dict[str, Any]],
                        Event]  # fmt: skip


def trusted_maker(vm: str, request: str, obj: str, action: str, point: PointInfo) -> TrustedMaker:
    """A maker of :class:`Event` objects for one request at one point, without
    validation: the security space's hot path makes hundreds of thousands a second, and
    validating each cost more than decoding it (issue 12). What every event of the pair
    shares is filled in once; each call gives ``(time, process, fields, decode_errors,
    detail)``. The result is an ordinary ``Event`` (the same object ``model_construct``
    would make, minus its per-call bookkeeping); a unit test holds it equal to a
    validated one."""
    template = {**_TEMPLATE, "vm": vm, "request": request, "object": obj, "action": action,
                "point": point}  # fmt: skip
    copy, new = template.copy, _new_event
    set_dict, set_fields_set, set_extra, set_private = (
        _set_dict, _set_fields_set, _set_extra, _set_private)  # fmt: skip

    def make(time: float, process: ProcessContext | None, fields: dict[str, Any],
             decode_errors: list[str], detail: dict[str, Any]) -> Event:  # fmt: skip
        ev = new(Event)
        d = copy()  # the fields in their order; faster than a literal (measured)
        d["time"] = time
        d["process"] = process
        d["fields"] = fields
        d["decode_errors"] = decode_errors
        d["detail"] = detail
        set_dict(ev, d)
        set_fields_set(ev, _ALL_SET)
        set_extra(ev, None)
        set_private(ev, None)
        return ev

    return make
