"""Module objects: a kernel module is initialised (``do_init_module``)."""

from __future__ import annotations

from typing import Any

from vmshield.guest.kernel import Kernel
from vmshield.objects.context import PointContext
from vmshield.objects.model import COMMON_FILTERS, NON_DENY, CatalogObject
from vmshield.space import layout as L
from vmshield.space.captures import Captured, Plan, fetch

MODULE_NAME_LEN = 56


def _module(c: PointContext) -> dict[str, Any]:
    """do_init_module(struct module *mod)."""
    mod = c.arg(0)
    return {"name": c.kernel.cstring(mod + c.off("module", "name"), MODULE_NAME_LEN)}


def _module_plan(k: Kernel) -> Plan:
    # 64 > MODULE_NAME_LEN: a name that fills its array is not "truncated".
    return Plan((fetch(L.F_KSTR, 0, (k.member_offset("module", "name"),), 64),), _captured,
                agg_key=L.K_NAME)  # fmt: skip


def _captured(c: Captured) -> dict[str, Any]:
    return {"name": c.item(0, "name").text()}


OBJECTS = (
    CatalogObject("module.load", "a kernel module is initialised", ("do_init_module",),
                  ("name",), COMMON_FILTERS, NON_DENY, _module, plan=_module_plan),
)  # fmt: skip
