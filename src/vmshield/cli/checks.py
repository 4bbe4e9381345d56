"""Checks of a monitor's requests that need no VM, run before anything is attached.

A request naming a filter value of the wrong type would otherwise be armed and
silently never match; here it is one line and exit status 2 with nothing armed.
"""

from __future__ import annotations

from pydantic import ValidationError

from vmshield.errors import VmshieldError
from vmshield.monitor.request import IsolationRequest, parse_filters, parse_object_spec, validate


def requests(
    target: str, objects: list[str], filters: list[str], action: str
) -> list[IsolationRequest]:
    """The monitor's requests from its options, each validated against the catalog
    (object, filter names and typed values, action)."""
    if not objects:
        raise VmshieldError("give at least one --object")
    flt = parse_filters(filters)
    out = []
    for spec in objects:
        name, o_flt, o_action = parse_object_spec(spec)
        try:
            req = IsolationRequest(
                vm=target, object=name, filters={**flt, **o_flt}, action=o_action or action
            )
        except ValidationError as e:  # our RequestError, wrapped by pydantic
            first = e.errors()[0]
            cause = first.get("ctx", {}).get("error")
            raise VmshieldError(str(cause) if cause else first["msg"]) from None
        validate(req)
        out.append(req)
    return out
