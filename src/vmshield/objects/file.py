"""File objects: a file is opened, removed or renamed (LSM hooks: ``deny`` allowed)."""

from __future__ import annotations

from typing import Any

from vmshield.guest.kernel import Kernel
from vmshield.objects.context import PointContext
from vmshield.objects.fields import captured_path, path_field
from vmshield.objects.model import ALL_ACTIONS, COMMON_FILTERS, CatalogObject
from vmshield.space import layout as L
from vmshield.space.captures import PATH_MAX_CAPTURE, Captured, Plan, fetch

FILTERS = (*COMMON_FILTERS, "path")


def _dentry_path(k: Kernel, dir_arg: int, dentry_arg: int) -> L.Fetch:
    """The path of ``dentry`` (a name) in ``dir`` (a ``struct path *``), as the agent
    builds it: the directory's path, then the dentry's name."""
    name = k.member_offset("dentry", "d_name.name")
    return fetch(L.F_DPATH, dir_arg, (0,), PATH_MAX_CAPTURE, dentry_arg, name)


# -- file.open ------------------------------------------------------------------------


def _open(c: PointContext) -> dict[str, Any]:
    """security_file_open(struct file *file)."""
    f = c.arg(0)
    k = c.kernel
    return {
        **path_field(c.file_path(f)),
        "flags": k.u32(f + c.off("file", "f_flags")),
        "mode": k.u32(f + c.off("file", "f_mode")),
    }


def _open_plan(k: Kernel) -> Plan:
    off = k.member_offset
    return Plan(
        (fetch(L.F_DPATH, 0, (off("file", "f_path"),), PATH_MAX_CAPTURE),
         fetch(L.F_KMEM, 0, (off("file", "f_flags"),), 4),
         fetch(L.F_KMEM, 0, (off("file", "f_mode"),), 4)),
        _open_captured, path_item=0, agg_key=L.K_PATH,
    )  # fmt: skip


def _open_captured(c: Captured) -> dict[str, Any]:
    return {
        **captured_path(c, 0, "path"),
        "flags": c.item(1, "flags").u(0, 4),
        "mode": c.item(2, "mode").u(0, 4),
    }


# -- file.unlink ----------------------------------------------------------------------


def _unlink(c: PointContext) -> dict[str, Any]:
    """security_path_unlink(const struct path *dir, struct dentry *dentry)."""
    d = c.path_of(c.arg(0))
    return path_field(d.rstrip("/") + "/" + c.dentry_name(c.arg(1)))


def _unlink_plan(k: Kernel) -> Plan:
    return Plan((_dentry_path(k, 0, 1),), lambda c: captured_path(c, 0, "path"), 0,
                agg_key=L.K_PATH)  # fmt: skip


# -- file.rename ----------------------------------------------------------------------


def _rename(c: PointContext) -> dict[str, Any]:
    """security_path_rename(old_dir, old_dentry, new_dir, new_dentry, flags)."""
    old = c.path_of(c.arg(0)).rstrip("/") + "/" + c.dentry_name(c.arg(1))
    new = c.path_of(c.arg(2)).rstrip("/") + "/" + c.dentry_name(c.arg(3))
    return {**path_field(old), "new_path": new}


def _rename_plan(k: Kernel) -> Plan:
    return Plan((_dentry_path(k, 0, 1), _dentry_path(k, 2, 3)), _rename_captured, path_item=0,
                agg_key=L.K_PATH)  # fmt: skip


def _rename_captured(c: Captured) -> dict[str, Any]:
    return {**captured_path(c, 0, "path"), "new_path": c.item(1, "new path").text()}


OBJECTS = (
    CatalogObject("file.open", "a file is opened", ("security_file_open",),
                  ("path", "flags", "mode"), FILTERS, ALL_ACTIONS, _open, plan=_open_plan),
    CatalogObject("file.unlink", "a file is removed", ("security_path_unlink",), ("path",),
                  FILTERS, ALL_ACTIONS, _unlink, plan=_unlink_plan),
    CatalogObject("file.rename", "a file is renamed", ("security_path_rename",),
                  ("path", "new_path"), FILTERS, ALL_ACTIONS, _rename, plan=_rename_plan),
)  # fmt: skip
