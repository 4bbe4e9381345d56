"""From one hit to events: filters, decoding, actions and statistics, for both engines.

A hit (a breakpoint stop, or a record the agent wrote) names the process and the
requests armed at its point. Each request is filtered on the process first (cheap),
then the behaviour is decoded once, then filtered on its fields; an action failure
still produces the event, saying what failed. Requests the agent already decided in
the guest (deny/kill rules) are taken as decided.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from vmshield.errors import VmshieldError
from vmshield.monitor.actions import ActionRefused
from vmshield.monitor.events import Event, PointInfo, ProcessContext
from vmshield.monitor.request import ResolvedRequest
from vmshield.objects.filters import match_filter

RANK = {"log": 0, "dump": 1, "pause": 2, "kill": 3, "deny": 4}  # strongest verdict wins
PROCESS_KEYS = ("pid", "comm", "uid")


class Stats(Protocol):
    events: int
    filtered: int
    decode_errors: int
    by_object: dict[str, int]


@dataclass
class Hit:
    """What the engine knows about one hit, and how to act on it."""

    vm: str
    time: float
    process: ProcessContext | None
    decode: Callable[[ResolvedRequest], dict[str, Any] | None]  # None: not this behaviour
    act: Callable[[str, ResolvedRequest], dict[str, Any]]
    point: Callable[[ResolvedRequest], PointInfo]
    errors: list[str] = field(default_factory=list)  # decode errors, shared by the events
    # Position of a request -> whether the guest matched it (absent: filter here).
    decided: dict[int, bool] = field(default_factory=dict)


def dispatch(
    hit: Hit, reqs: list[ResolvedRequest], stats: Stats, emit: Callable[[Event], None]
) -> str:
    """Emit the events of one hit; return the strongest action taken."""
    proc_d: dict[str, Any] = hit.process.model_dump() if hit.process else {}
    verdict = "log"
    decoded: dict[str, Any] | None = None
    for pos, r in enumerate(reqs):
        flt = r.request.filters
        guest = hit.decided.get(pos)
        if guest is False or (
            guest is None
            and any(
                k in PROCESS_KEYS and not match_filter(k, v, {}, proc_d) for k, v in flt.items()
            )
        ):
            stats.filtered += 1
            continue
        if decoded is None:
            try:
                got = hit.decode(r)
            except VmshieldError as e:
                hit.errors.append(f"decode: {e}")
                got = {}
            if got is None:  # e.g. another program at a user-space point's address
                stats.filtered += 1
                continue
            decoded = got
        if guest is None and not all(match_filter(k, v, decoded, proc_d) for k, v in flt.items()):
            stats.filtered += 1
            continue
        action = r.request.action
        try:
            detail = hit.act(action, r)
        except ActionRefused as e:  # by policy (rate limit, no room): said in the event
            detail = {"refused": f"{action}: {e}"}
            action = "log"
        except VmshieldError as e:  # the event still goes out, saying what failed
            detail = {"error": f"{action} failed: {e}"}
            action = "log"
        verdict = max(verdict, action, key=RANK.__getitem__)
        stats.events += 1
        stats.by_object[r.request.object] = stats.by_object.get(r.request.object, 0) + 1
        stats.decode_errors += bool(hit.errors)
        emit(
            Event(
                time=hit.time, vm=hit.vm, request=r.request.id, object=r.request.object,
                action=action, process=hit.process, fields=decoded, point=hit.point(r),
                decode_errors=list(hit.errors), detail=detail,
            )
        )  # fmt: skip
    return verdict
