"""BPF objects: the bpf() system call (``security_bpf``, an LSM hook)."""

from __future__ import annotations

from typing import Any

from vmshield.objects.model import ALL_ACTIONS, COMMON_FILTERS, CatalogObject
from vmshield.space.captures import Plan


def _cmd(sarg0: int) -> dict[str, Any]:
    """security_bpf(int cmd, union bpf_attr *attr, unsigned int size)."""
    return {"cmd": sarg0 & 0xFFFFFFFF}


OBJECTS = (
    CatalogObject(
        "bpf.load", "the bpf() system call", ("security_bpf",), ("cmd",), COMMON_FILTERS,
        ALL_ACTIONS, lambda c: _cmd(c.sarg(0)),
        plan=lambda k: Plan((), lambda c: _cmd(c.sarg(0)), nargs=1),
    ),
)  # fmt: skip
