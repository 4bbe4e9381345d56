"""``kfunc:SYMBOL``: any traceable kernel function, its six raw argument registers."""

from __future__ import annotations

from typing import Any

from vmshield.objects.context import PointContext
from vmshield.objects.model import ALL_ACTIONS, COMMON_FILTERS, NON_DENY, CatalogObject
from vmshield.space.captures import Captured, Plan

KFUNC = "kfunc:"


def _raw(c: PointContext) -> dict[str, Any]:
    return {"args": [f"{c.arg(i):#x}" for i in range(6)]}


def _raw_captured(c: Captured) -> dict[str, Any]:
    return {"args": [f"{a:#x}" for a in c.args]}


PLAN = Plan((), _raw_captured, nargs=6, raw_args=True)  # arguments only: no struct offsets to read


def kfunc_object(symbol: str) -> CatalogObject:
    """The object for ``kfunc:SYMBOL`` (``deny`` only for LSM hooks, ``security_*``)."""
    actions = ALL_ACTIONS if symbol.startswith("security_") else NON_DENY
    return CatalogObject(
        f"{KFUNC}{symbol}", f"kernel function {symbol}", (symbol,), ("args",),
        COMMON_FILTERS, actions, _raw, plan=lambda k: PLAN,
    )  # fmt: skip
