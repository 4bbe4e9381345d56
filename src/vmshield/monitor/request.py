"""Isolation requests: ``{vm, object, filters, action}``, validated before anything is armed.

Validation happens in two steps, both before the guest is touched: against the catalog
(unknown object, a filter the object does not have, an action it cannot take) and
against the kernel (a symbol this kernel lacks). A bad request changes nothing.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from pydantic import BaseModel, Field, field_validator

from vmshield.errors import SymbolError, VmshieldError
from vmshield.guest.ftrace import MonitoringPoint, place_point
from vmshield.guest.kernel import Kernel
from vmshield.monitor import ufunc
from vmshield.monitor.catalog import CATALOG, KFUNC, CatalogObject, kfunc_object, ufunc_object


class RequestError(VmshieldError):
    """An isolation request that cannot be carried out as asked."""


class IsolationRequest(BaseModel):
    """``{vm, object, filters, action}``: what to watch in which VM and what to do when
    it happens. The object must be in the catalog (checked here); its filters, action
    and monitoring point are checked against the kernel when a monitor resolves it."""

    vm: str
    object: str
    filters: dict[str, str] = Field(default_factory=dict)
    action: str = "log"
    id: str = Field(default_factory=lambda: "req-" + secrets.token_hex(4))

    @field_validator("object")
    @classmethod
    def _known_object(cls, v: str) -> str:
        catalog_object(v)
        return v


UFUNC = "ufunc:"


def parse_ufunc(name: str) -> tuple[str, int | None, str | None]:
    """``ufunc:PATH:SYMBOL|OFFSET`` -> (PATH, OFFSET or None, SYMBOL or None)."""
    body = name[len(UFUNC) :]
    path, sep, what = body.rpartition(":")
    if not sep or not path.startswith("/") or not what:
        raise RequestError(f"bad user-space point {name!r}: use ufunc:/ABS/PATH:SYMBOL|OFFSET")
    if what[0].isdigit():
        try:
            offset = int(what, 0)
        except ValueError:
            raise RequestError(f"bad offset {what!r} in {name!r}") from None
        return path, offset, None
    if len(what) > 255 or not what.replace("_", "a").replace(".", "a").isalnum():
        raise RequestError(f"bad symbol {what!r} in {name!r}")
    return path, None, what


def catalog_object(name: str) -> CatalogObject:
    if name.startswith(UFUNC):
        parse_ufunc(name)
        return ufunc_object(name)
    if name.startswith("process:"):
        who = name[len("process:") :]
        if not who or len(who) > 15 or not all(ch.isprintable() for ch in who):
            raise RequestError(f"bad process in {name!r}: give a pid or a comm")
        return CATALOG["process.exec"]
    if name.startswith(KFUNC):
        sym = name[len(KFUNC) :]
        if not sym or not sym.replace("_", "a").replace(".", "a").isalnum():
            raise RequestError(f"bad kernel function name in {name!r}")
        return kfunc_object(sym)
    obj = CATALOG.get(name)
    if obj is None:
        known = (
            ", ".join(sorted(CATALOG))
            + ", kfunc:SYMBOL, ufunc:PATH:SYMBOL|OFFSET, process:PID|COMM"
        )
        raise RequestError(f"unknown isolation object {name!r} (known: {known})")
    return obj


@dataclass
class ResolvedRequest:
    request: IsolationRequest
    obj: CatalogObject
    point: MonitoringPoint


def parse_object_spec(spec: str) -> tuple[str, dict[str, str], str | None]:
    """``OBJ[,KEY=VALUE...][,action=A]`` -> (object, filters, action or None)."""
    name, *rest = spec.split(",")
    flt = parse_filters(rest)
    action = flt.pop("action", None)
    return name, flt, action


def parse_filters(items: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for it in items:
        key, sep, val = it.partition("=")
        if not sep or not key or not val:
            raise RequestError(f"bad filter {it!r}: use KEY=VALUE, e.g. comm=sshd")
        out[key] = val
    return out


PROCESS = "process:"
PROCESS_OBJECTS = (
    "process.exec", "process.exit", "process.fork", "file.open", "file.unlink",
    "file.rename", "net.connect", "net.bind", "net.listen", "cred.change",
    "ptrace.attach", "bpf.load", "module.load",
)  # fmt: skip


def resolve_all(req: IsolationRequest, kernel: Kernel) -> list[ResolvedRequest]:
    """A request as the points it needs: ``process:PID|COMM`` is every behaviour of the
    catalog for that process (a pid or comm filter on each); others are one point."""
    if not req.object.startswith(PROCESS):
        return [resolve(req, kernel)]
    who = req.object[len(PROCESS) :]
    key = "pid" if who.isdigit() else "comm"
    out = []
    for name in PROCESS_OBJECTS:
        sub = req.model_copy(update={"object": name, "filters": {**req.filters, key: who}})
        if req.action not in catalog_object(name).actions:
            sub = sub.model_copy(update={"action": "log"})
        try:
            out.append(resolve(sub, kernel))
        except RequestError:
            if name == "module.load":
                continue
            raise
    return out


def resolve(req: IsolationRequest, kernel: Kernel) -> ResolvedRequest:
    obj = catalog_object(req.object)
    for key in req.filters:
        if key not in obj.filters:
            raise RequestError(
                f"{req.object} has no filter {key!r} (it has: {', '.join(obj.filters)})"
            )
    if obj.default_filters:
        req.filters = {**dict(obj.default_filters), **req.filters}
    if req.action not in obj.actions:
        raise RequestError(
            f"{req.object} cannot take action {req.action!r} (it can: {', '.join(obj.actions)})"
        )
    if req.object.startswith(UFUNC):
        return _resolve_ufunc(req, obj, kernel)
    for sym in obj.candidates:
        if sym in kernel.symbols:
            try:
                point = place_point(kernel, sym)
            except SymbolError as e:
                raise RequestError(f"{req.object}: {e}") from e
            return ResolvedRequest(req, obj, point)
    raise RequestError(
        f"{req.object}: this kernel ({kernel.release}) has none of {', '.join(obj.candidates)}"
    )


def _resolve_ufunc(req: IsolationRequest, obj: CatalogObject, kernel: Kernel) -> ResolvedRequest:
    path, offset, symbol = parse_ufunc(req.object)
    try:
        up = ufunc.locate(kernel, path, offset, symbol)
    except VmshieldError as e:
        raise RequestError(f"{req.object}: {e}") from e
    label = f"{path}:{symbol}" if symbol else f"{path}+{up.offset:#x}"
    point = MonitoringPoint(label, up.address, up.address, up.address, False)
    bound = CatalogObject(
        obj.name, obj.summary, obj.candidates, obj.fields, obj.filters, obj.actions,
        lambda c: ufunc.decode(c, up),
    )  # fmt: skip
    return ResolvedRequest(req, bound, point)
