"""What an isolation object is, as data, and the action sets objects choose from.

``deny`` is allowed only where failing is the kernel's own contract: LSM hooks
(``security_*``), for catalog objects and ``kfunc:`` functions alike.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from vmshield.guest.kernel import Kernel
from vmshield.objects.context import PointContext
from vmshield.space.captures import Plan

Decoder = Callable[[PointContext], dict[str, Any] | None]  # None: not this behaviour
Planner = Callable[[Kernel], Plan]  # the capture plan, for this kernel's struct layout
COMMON_FILTERS = ("pid", "comm", "uid")
NON_DENY = ("log", "kill", "pause", "dump")
ALL_ACTIONS = ("log", "deny", "kill", "pause", "dump")
INTEGRITY_ACTIONS = ("log", "restore", "pause", "dump")
REPORT_ACTIONS = ("log", "pause", "dump")


@dataclass(frozen=True)
class CatalogObject:
    """One isolation object: its candidate kernel functions (first one this kernel has
    wins; the event says which fired), the fields its decoders produce, the filters it
    accepts, the actions it allows, and how each engine observes it."""

    name: str
    summary: str
    candidates: tuple[str, ...]
    fields: tuple[str, ...]
    filters: tuple[str, ...]
    actions: tuple[str, ...]
    decoder: Decoder = field(repr=False)  # the exit engine's, on live memory at a stop
    # Filters applied unless the request sets the key itself (``changed=*`` to see all).
    default_filters: tuple[tuple[str, str], ...] = ()
    # The security space's capture plan and decoder; None: the space cannot serve it.
    plan: Planner | None = field(default=None, repr=False)
