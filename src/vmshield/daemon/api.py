"""REST routes only: authentication, tenant scoping and the shape of each answer.

Everything that changes a VM goes through :class:`~vmshield.daemon.registry.Registry`;
every read of events goes to the store, so a client never sees an event that is not
stored. Another tenant's VM is answered exactly like a VM that does not exist (404).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import PlainTextResponse, StreamingResponse

import vmshield
from vmshield.daemon.models import (
    EventPage,
    Health,
    IsolationCreate,
    IsolationList,
    IsolationOut,
    ProblemDoc,
    VmCreate,
    VmList,
    VmOut,
)
from vmshield.daemon.registry import LATENCY_BUCKETS, Problem, Registry, not_found
from vmshield.store import Principal, Store, StoredEvent

router = APIRouter()
PROBLEMS: dict[int | str, dict[str, Any]] = {
    code: {"model": ProblemDoc, "content": {"application/problem+json": {}}}
    for code in (401, 404, 409, 413, 422)
}


def _registry(request: Request) -> Registry:
    reg: Registry = request.app.state.registry
    return reg


def _store(request: Request) -> Store:
    st: Store = request.app.state.store
    return st


async def principal(
    request: Request, authorization: Annotated[str | None, Header()] = None
) -> Principal:
    """The bearer token's tenant; without a token, the local admin on a Unix socket
    (its 0600 mode is the access control), else 401."""
    if not authorization:
        if request.app.state.local_trust:
            return Principal("local", True)
        raise Problem(401, "Unauthorized", "a bearer token is required (Authorization: Bearer)")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Problem(401, "Unauthorized", "use Authorization: Bearer TOKEN")
    who = await run_in_threadpool(_store(request).principal, token.strip())
    if who is None:
        raise Problem(401, "Unauthorized", "unknown token")
    return who


Who = Annotated[Principal, Depends(principal)]


def _own_vm(store: Store, who: Principal, vm_id: str) -> dict[str, Any]:
    row = store.vm(vm_id)
    if row is None or not (who.admin or row["tenant"] == who.tenant):
        raise not_found(f"no VM {vm_id!r}")
    return row


def _own_isolation(store: Store, who: Principal, req_id: str) -> dict[str, Any]:
    row = store.isolation(req_id)
    if row is None:
        raise not_found(f"no isolation request {req_id!r}")
    try:
        _own_vm(store, who, row["vm"])
    except Problem:
        raise not_found(f"no isolation request {req_id!r}") from None
    return row


@router.get("/v1/health", response_model=Health)
def health(request: Request) -> Health:
    reg = _registry(request)
    return Health(status="ok", host=reg.host, version=vmshield.__version__, vms=len(reg.slots))


@router.post("/v1/vms", response_model=VmOut, status_code=201, responses=PROBLEMS)
def create_vm(body: VmCreate, who: Who, request: Request) -> dict[str, Any]:
    return _registry(request).register(who, body.target, body.name)


@router.get("/v1/vms", response_model=VmList, responses=PROBLEMS)
def list_vms(who: Who, request: Request) -> dict[str, Any]:
    return {"vms": _store(request).vms(who)}


@router.get("/v1/vms/{vm_id}", response_model=VmOut, responses=PROBLEMS)
def get_vm(vm_id: str, who: Who, request: Request) -> dict[str, Any]:
    return _own_vm(_store(request), who, vm_id)


@router.delete("/v1/vms/{vm_id}", status_code=204, responses=PROBLEMS)
def delete_vm(vm_id: str, who: Who, request: Request) -> Response:
    _own_vm(_store(request), who, vm_id)
    _registry(request).unregister(vm_id)
    return Response(status_code=204)


@router.post(
    "/v1/vms/{vm_id}/isolations", response_model=IsolationOut, status_code=201, responses=PROBLEMS
)
def create_isolation(
    vm_id: str, body: IsolationCreate, who: Who, request: Request
) -> dict[str, Any]:
    _own_vm(_store(request), who, vm_id)
    return _registry(request).add_request(vm_id, body.object, body.filters, body.action)


@router.get("/v1/vms/{vm_id}/isolations", response_model=IsolationList, responses=PROBLEMS)
def list_isolations(vm_id: str, who: Who, request: Request) -> dict[str, Any]:
    _own_vm(_store(request), who, vm_id)
    return {"isolations": _store(request).isolations(vm_id)}


@router.get("/v1/isolations/{req_id}", response_model=IsolationOut, responses=PROBLEMS)
def get_isolation(req_id: str, who: Who, request: Request) -> dict[str, Any]:
    return _own_isolation(_store(request), who, req_id)


@router.delete("/v1/isolations/{req_id}", status_code=204, responses=PROBLEMS)
def delete_isolation(req_id: str, who: Who, request: Request) -> Response:
    _own_isolation(_store(request), who, req_id)
    _registry(request).remove_request(req_id)
    return Response(status_code=204)


def _served(ev: StoredEvent) -> dict[str, Any]:
    """The stored event as served: the event object plus its store ``id`` and the
    daemon's ``vm_id`` (the event's own ``vm`` is the target's name)."""
    out: dict[str, Any] = json.loads(ev.json)
    out["id"] = ev.id
    out["vm_id"] = ev.vm
    return out


def _cursor(cursor: str | None) -> int:
    if cursor is None:
        return 0
    if not cursor.isdigit() or len(cursor) > 19:
        raise Problem(
            422, "Unprocessable Content", f"cursor {cursor!r}: not a cursor this API gave"
        )
    return int(cursor)


@router.get("/v1/events", response_model=EventPage, responses=PROBLEMS)
def list_events(
    who: Who,
    request: Request,
    vm: Annotated[str | None, Query(max_length=32)] = None,
    object: Annotated[str | None, Query(max_length=512)] = None,
    since: Annotated[float | None, Query(description="epoch seconds", ge=0, le=1e11)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: Annotated[str | None, Query(max_length=32)] = None,
) -> dict[str, Any]:
    after = _cursor(cursor)
    if vm is not None:
        _own_vm(_store(request), who, vm)
    rows = _store(request).events(who, vm=vm, obj=object, since=since, after=after, limit=limit)
    return {
        "events": [_served(r) for r in rows],
        "next_cursor": str(rows[-1].id if rows else after),
    }


@router.get(
    "/v1/events/stream",
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "Server-Sent Events"},
        **PROBLEMS,
    },
    response_class=StreamingResponse,
)
async def stream_events(
    who: Who,
    request: Request,
    vm: Annotated[str | None, Query(max_length=32)] = None,
    object: Annotated[str | None, Query(max_length=512)] = None,
    last_event_id: Annotated[str | None, Header(max_length=32)] = None,
) -> StreamingResponse:
    """New events as they are stored; ``Last-Event-ID`` resumes after that event."""
    store = _store(request)
    if vm is not None:
        await run_in_threadpool(_own_vm, store, who, vm)
    if last_event_id is not None:
        after = _cursor(last_event_id)
    else:
        after = await run_in_threadpool(store.last_event_id)
    hub = request.app.state.hub
    return StreamingResponse(
        _sse(request, store, hub, who, vm, object, after),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


async def _sse(
    request: Request,
    store: Store,
    hub: Any,
    who: Principal,
    vm: str | None,
    obj: str | None,
    after: int,
) -> AsyncIterator[str]:
    yield "retry: 1000\n\n"
    wake = hub.listen()
    last_beat = time.monotonic()
    try:
        while not hub.closing:
            rows = await run_in_threadpool(
                store.events, who, vm=vm, obj=obj, after=after, limit=500
            )
            for r in rows:
                after = r.id
                yield f"id: {r.id}\nevent: event\ndata: {json.dumps(_served(r))}\n\n"
            if rows:
                continue
            if await request.is_disconnected():
                return
            if time.monotonic() - last_beat > 15:
                last_beat = time.monotonic()
                yield ": keep-alive\n\n"
            # woken by this host's events; the timeout picks up other hosts' (shared store)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), timeout=1.0)
            wake.clear()
    finally:
        hub.forget(wake)


@router.get("/metrics", response_class=PlainTextResponse, responses=PROBLEMS)
def metrics(who: Who, request: Request) -> PlainTextResponse:
    """Prometheus text: this daemon's VMs visible to the caller."""
    reg = _registry(request)
    visible = {v["id"] for v in _store(request).vms(who)}
    m = reg.metrics
    lines = [
        "# HELP vmshield_events_total Events stored, by VM and object.",
        "# TYPE vmshield_events_total counter",
    ]
    with m.lock:
        events = dict(m.events)
        alerts = dict(m.alerts)
        latency, added = copy.deepcopy(m.latency), copy.deepcopy(m.added)
    for (vm, obj), n in sorted(events.items()):
        if vm in visible:
            lines.append(f'vmshield_events_total{{vm="{vm}",object="{_esc(obj)}"}} {n}')
    lines += [
        "# HELP vmshield_drops_total Events lost, by VM and kind (ring: guest ring full; queue: "
        "store writer behind; "
        "store: could not be stored; subscriber: a slow reader).",
        "# TYPE vmshield_drops_total counter",
    ]
    for vm, name, n in _store(request).counters(visible):
        kind = name.removeprefix("drops.")
        lines.append(f'vmshield_drops_total{{vm="{vm}",kind="{_esc(kind)}"}} {n}')
    for vm, n in reg.event_drops().items():
        if vm in visible:
            lines.append(f'vmshield_drops_total{{vm="{vm}",kind="subscriber"}} {n}')
    lines += [
        "# HELP vmshield_armed_points Monitoring points armed, by VM.",
        "# TYPE vmshield_armed_points gauge",
    ]
    for vm, n in sorted(reg.armed_points().items()):
        if vm in visible:
            lines.append(f'vmshield_armed_points{{vm="{vm}"}} {n}')
    lines += [
        "# HELP vmshield_integrity_alerts_total Security-space integrity alerts, by VM.",
        "# TYPE vmshield_integrity_alerts_total counter",
    ]
    for vm, n in sorted(alerts.items()):
        if vm in visible:
            lines.append(f'vmshield_integrity_alerts_total{{vm="{vm}"}} {n}')
    for name, hist, text in (
        ("vmshield_event_latency_seconds", latency,
         "From the event's own time (guest clock for the security space) to stored."),
        ("vmshield_store_latency_seconds", added,
         "From the engine handing the event over to stored (the daemon's own delay)."),
    ):  # fmt: skip
        lines += [f"# HELP {name} {text}", f"# TYPE {name} histogram"]
        for edge, n in zip(LATENCY_BUCKETS, hist.buckets, strict=True):
            lines.append(f'{name}_bucket{{le="{edge}"}} {n}')
        lines.append(f'{name}_bucket{{le="+Inf"}} {hist.count}')
        lines.append(f"{name}_sum {hist.total}")
        lines.append(f"{name}_count {hist.count}")
    return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")


def _esc(label: str) -> str:
    return label.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
