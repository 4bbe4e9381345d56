"""Field helpers more than one family shares, each in its live (exit engine) and its
captured (security space) form, so that both produce the same fields."""

from __future__ import annotations

from typing import Any

from vmshield.guest.kernel import Kernel
from vmshield.space import layout as L
from vmshield.space.captures import Captured, fetch

PATH_KEYS = ("path", "filename")  # the fields a ``path`` filter reads


def path_field(path: str, key: str = "path") -> dict[str, Any]:
    """A path read live, flagged when its root-most part is unknown (see
    guest/files.py), so that path filters treat it as a possible match."""
    out: dict[str, Any] = {key: path}
    if path.startswith(".../") and key == "path":
        out["path_truncated"] = True
    return out


def captured_path(c: Captured, n: int, what: str, key: str = "path") -> dict[str, Any]:
    """A captured path; one cut to fit the record keeps its root-most part and says so
    (``path_truncated``), so that path filters treat it as a possible match."""
    it = c.item(n, what)
    out: dict[str, Any] = {key: it.text()}
    if it.status == L.S_TRUNC and key in PATH_KEYS:
        out["path_truncated"] = True
    return out


def task_fetches(k: Kernel, base: int) -> tuple[L.Fetch, ...]:
    """Captures of a ``struct task_struct *``'s pid, tgid and comm (items 0-2)."""
    off = k.member_offset
    return (
        fetch(L.F_KMEM, base, (off("task_struct", "pid"),), 4),
        fetch(L.F_KMEM, base, (off("task_struct", "tgid"),), 4),
        fetch(L.F_KMEM, base, (off("task_struct", "comm"),), 16),
    )


def captured_task(c: Captured, prefix: str) -> tuple[int, int, str]:
    """pid, tgid and comm captured by :func:`task_fetches`."""
    pid = c.item(0, f"{prefix} pid").u(0, 4, signed=True)
    tgid = c.item(1, f"{prefix} tgid").u(0, 4, signed=True)
    return pid, tgid, c.item(2, f"{prefix} comm").text()
