"""The catalog: every family's objects by name, and each object's capture plan.

The order of the families is the order ``vmshield catalog`` lists them in.
"""

from __future__ import annotations

from vmshield.errors import VmshieldError
from vmshield.guest.kernel import Kernel
from vmshield.objects import bpf, cred, file, integrity, module, net, process, ptrace
from vmshield.objects.kfunc import KFUNC, kfunc_object
from vmshield.objects.model import CatalogObject
from vmshield.space.captures import Plan

CATALOG: dict[str, CatalogObject] = {
    o.name: o for family in (process, file, net, cred, module, ptrace, bpf) for o in family.OBJECTS
}
INTEGRITY: dict[str, CatalogObject] = {o.name: o for o in integrity.OBJECTS}
"""Sensitive modules: objects checked from the host against a reference (see
:mod:`vmshield.monitor.integrity`), on either engine; no monitoring point."""


def plan_for(obj: str, k: Kernel) -> Plan:
    """The security space's capture plan of a catalog object, for this kernel
    (``kfunc:`` objects are made per function, not listed: their plan is their own)."""
    o = kfunc_object(obj[len(KFUNC) :]) if obj.startswith(KFUNC) else CATALOG.get(obj)
    if o is None or o.plan is None:
        raise VmshieldError(f"{obj} cannot be monitored through the security space")
    return o.plan(k)
