"""Ptrace objects: a process asks to trace another (an LSM hook: ``deny`` allowed)."""

from __future__ import annotations

from typing import Any

from vmshield.objects.context import PointContext
from vmshield.objects.fields import captured_task, task_fetches
from vmshield.objects.model import ALL_ACTIONS, COMMON_FILTERS, CatalogObject
from vmshield.space.captures import Captured, Plan


def _ptrace(c: PointContext) -> dict[str, Any]:
    """security_ptrace_access_check(struct task_struct *child, unsigned int mode)."""
    t = c.tasks.info(c.arg(0))
    return {"tracee_pid": t.pid, "tracee_comm": t.comm, "mode": c.arg(1) & 0xFFFFFFFF}


def _captured(c: Captured) -> dict[str, Any]:
    pid, _tgid, comm = captured_task(c, "tracee")
    return {"tracee_pid": pid, "tracee_comm": comm, "mode": c.arg(1) & 0xFFFFFFFF}


OBJECTS = (
    CatalogObject(
        "ptrace.attach", "a process asks to trace another", ("security_ptrace_access_check",),
        ("tracee_pid", "tracee_comm", "mode"), COMMON_FILTERS, ALL_ACTIONS, _ptrace,
        plan=lambda k: Plan(task_fetches(k, 0), _captured, nargs=2),
    ),
)  # fmt: skip
