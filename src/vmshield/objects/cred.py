"""Credential objects: a process changes identity (``commit_creds``)."""

from __future__ import annotations

from typing import Any

from vmshield.guest.kernel import Kernel
from vmshield.objects.context import PointContext
from vmshield.objects.model import COMMON_FILTERS, NON_DENY, CatalogObject
from vmshield.space import layout as L
from vmshield.space.captures import Captured, Decode, Plan, fetch

CRED_FIELDS = ("uid", "euid", "gid", "egid", "fsuid", "cap_effective")


def _verdicts(out: dict[str, Any]) -> None:
    """``escalation`` and ``changed`` from the old and new identities in ``out``."""
    out["escalation"] = out["new_euid"] == 0 and out["old_euid"] != 0
    out["changed"] = any(out[f"old_{f}"] != out[f"new_{f}"] for f in CRED_FIELDS)


def _creds(c: PointContext) -> dict[str, Any]:
    """commit_creds(struct cred *new): old (current->cred) and new identities."""
    k = c.kernel
    new = c.arg(0)
    old = c.u64(c.current + c.off("task_struct", "cred"))
    out: dict[str, Any] = {}
    for tag, cred in (("old", old), ("new", new)):
        for f in CRED_FIELDS[:-1]:
            out[f"{tag}_{f}"] = k.u32(cred + c.off("cred", f))
        out[f"{tag}_cap_effective"] = f"{k.u64(cred + c.off('cred', 'cap_effective')):#x}"
    _verdicts(out)
    return out


def _cred_span(k: Kernel) -> tuple[int, int]:
    offs = [k.member_offset("cred", f) for f in CRED_FIELDS]
    return min(offs), max(offs) + 8


def _creds_plan(k: Kernel) -> Plan:
    """The span of ``struct cred`` holding every field, from the new cred and from
    ``current->cred``."""
    lo, hi = _cred_span(k)
    return Plan(
        (fetch(L.F_KMEM, 0, (lo,), hi - lo),
         fetch(L.F_KMEM, L.B_CURRENT, (k.member_offset("task_struct", "cred"), lo), hi - lo)),
        _creds_captured(k, lo), agg_key=L.K_EUID,
        cred_offsets=tuple(k.member_offset("cred", f) - lo for f in CRED_FIELDS),
    )  # fmt: skip


def _creds_captured(k: Kernel, lo: int) -> Decode:
    offs = {f: k.member_offset("cred", f) - lo for f in CRED_FIELDS}

    def decode(c: Captured) -> dict[str, Any]:
        new, old = c.item(0, "new cred"), c.item(1, "old cred")
        out: dict[str, Any] = {}
        for tag, it in (("old", old), ("new", new)):
            for f in CRED_FIELDS[:-1]:
                out[f"{tag}_{f}"] = it.u(offs[f], 4)
            out[f"{tag}_cap_effective"] = f"{it.u(offs['cap_effective'], 8):#x}"
        _verdicts(out)
        return out

    return decode


OBJECTS = (
    CatalogObject(
        "cred.change", "a process changes identity (privilege change)", ("commit_creds",),
        ("old_uid", "new_uid", "old_euid", "new_euid", "old_gid", "new_gid",
         "old_cap_effective", "new_cap_effective", "escalation", "changed"),
        (*COMMON_FILTERS, "escalation", "changed"), NON_DENY, _creds,
        (("changed", "True"),), plan=_creds_plan,
    ),
)  # fmt: skip
