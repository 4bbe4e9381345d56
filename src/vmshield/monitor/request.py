"""Isolation requests: ``{vm, object, filters, action}``, validated before anything is armed.

Validation happens in two steps, both before the guest is touched: against the catalog
(unknown object, a filter the object does not have, a filter value of the wrong type,
an action it cannot take; :func:`validate`, which needs no VM) and against the kernel
(a symbol this kernel lacks). A bad request changes nothing.

Filter values are typed: a ``uid=root`` or ``pid=abc`` would silently never match
(the filters compare numbers as decimal text), so they are refused with one line that
says what the filter takes; numbers are normalised (``pid=007`` is ``pid=7``).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from pydantic import BaseModel, Field, field_validator

from vmshield.errors import SymbolError, VmshieldError
from vmshield.guest.ftrace import MonitoringPoint, place_point
from vmshield.guest.kernel import Kernel
from vmshield.objects import ufunc
from vmshield.objects.catalog import CATALOG, INTEGRITY
from vmshield.objects.kfunc import KFUNC, kfunc_object
from vmshield.objects.model import ALL_ACTIONS, CatalogObject
from vmshield.objects.ufunc import UFUNC, ufunc_object


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
    obj = CATALOG.get(name) or INTEGRITY.get(name)
    if obj is None:
        known = (
            ", ".join(sorted(CATALOG) + sorted(INTEGRITY))
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


MAX_FILTER_LEN = 4096
COMM_LEN = 15  # TASK_COMM_LEN - 1: the kernel keeps no more of a process name
GLOB = frozenset("*?[")


def _number(key: str, val: str, limit: int) -> str:
    if not (val.isascii() and val.isdigit()) or int(val) >= limit:
        raise RequestError(f"filter {key}={val!r}: {key} takes a decimal number below {limit}")
    return str(int(val))


def check_filter(key: str, val: str) -> str:
    """One filter value checked for its key's type; the value to match with."""
    if not val or len(val) > MAX_FILTER_LEN or not val.isprintable():
        raise RequestError(
            f"filter {key}={val!r}: the value must be 1-{MAX_FILTER_LEN} printable characters"
        )
    if key == "pid":
        return _number(key, val, 1 << 31)
    if key == "uid":
        return _number(key, val, 1 << 32)
    if key == "port":
        if GLOB & set(val):
            if not set(val) <= set("0123456789*?[]!-"):
                raise RequestError(f"filter port={val!r}: a port is a number (or a digit glob)")
            return val
        return _number(key, val, 1 << 16)
    if key in ("escalation", "changed"):
        norm = {"true": "True", "false": "False", "*": "*"}.get(val.lower())
        if norm is None:
            raise RequestError(f"filter {key}={val!r}: {key} takes true, false or *")
        return norm
    if key == "comm" and not GLOB & set(val) and len(val.encode()) > COMM_LEN:
        raise RequestError(
            f"filter comm={val!r}: a process name is at most {COMM_LEN} bytes in the kernel "
            "(use a glob such as 'name*' for longer program names)"
        )
    if key == "address" and not set(val.lower()) <= set("0123456789abcdef.:*?[]!-"):
        raise RequestError(f"filter address={val!r}: an IPv4/IPv6 address (or a glob of one)")
    return val


def validate(req: IsolationRequest) -> CatalogObject:
    """Everything about a request that needs no VM: the object, each filter's name and
    value, the action. Normalises the filter values in place."""
    obj = catalog_object(req.object)
    if not req.object.startswith(PROCESS):
        for key in req.filters:
            if key not in obj.filters:
                raise RequestError(
                    f"{req.object} has no filter {key!r} (it has: {', '.join(obj.filters)})"
                )
    req.filters = {key: check_filter(key, val) for key, val in req.filters.items()}
    allowed = ALL_ACTIONS if req.object.startswith(PROCESS) else obj.actions
    if req.action not in allowed:
        raise RequestError(
            f"{req.object} cannot take action {req.action!r} (it can: {', '.join(allowed)})"
        )
    return obj


def parse_filters(items: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for it in items:
        key, sep, val = it.partition("=")
        if not sep or not key or not val:
            raise RequestError(f"bad filter {it!r}: use KEY=VALUE, e.g. comm=sshd")
        out[key] = val
    return out


PROCESS = "process:"
# Every catalog object; module.load last: a kernel without it is skipped, not refused.
PROCESS_OBJECTS = (*(n for n in CATALOG if n != "module.load"), "module.load")


def is_integrity(name: str) -> bool:
    """Whether ``name`` is a sensitive-module object (checked from the host, no point)."""
    return name in INTEGRITY


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
    obj = validate(req)
    if obj.default_filters:
        req.filters = {**dict(obj.default_filters), **req.filters}
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
    return ResolvedRequest(req, ufunc.bound_object(obj.name, up), point)
