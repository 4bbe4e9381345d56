"""The JSON shapes of the REST API (pydantic; they are the OpenAPI schemas)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class VmCreate(Strict):
    target: str = Field(
        min_length=1,
        max_length=1024,
        description="A lab VM name or a QEMU QMP socket path on the daemon's host.",
    )
    name: str | None = Field(default=None, min_length=1, max_length=128)


class VmStatus(BaseModel):
    engine: str | None = None
    security_space: str = "none"
    armed_points: int = 0
    fell_back: bool = False
    last_error: str | None = None
    symbol_source: str | None = None
    updated: float | None = None


class VmOut(BaseModel):
    id: str
    name: str
    target: str
    host: str
    tenant: str
    created: float
    kernel: str | None
    status: VmStatus


class VmList(BaseModel):
    vms: list[VmOut]


class IsolationCreate(Strict):
    object: str = Field(min_length=1, max_length=512, description="An isolation object id.")
    filters: dict[str, str] = Field(default_factory=dict, max_length=16)
    action: str = Field(default="log", min_length=1, max_length=16)


class IsolationOut(BaseModel):
    id: str
    vm: str
    object: str
    filters: dict[str, str]
    action: str
    state: str = Field(description="pending | armed | failed")
    reason: str | None
    created: float


class IsolationList(BaseModel):
    isolations: list[IsolationOut]


class EventPage(BaseModel):
    events: list[dict[str, Any]] = Field(
        description="vmshield.event/1 objects, oldest first, each with its store `id` and "
        "the daemon's `vm_id`."
    )
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page.")


class Health(BaseModel):
    status: str
    host: str
    version: str
    vms: int


class ProblemDoc(BaseModel):
    """RFC 9457 problem details."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str
    instance: str | None = None
