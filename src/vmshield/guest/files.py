"""Files and paths of the guest kernel (``struct path``, ``struct dentry``, mounts).

Full paths are rebuilt the way the kernel's d_path() does: up the dentry chain to the
mount's root, then across to the mount point in the parent mount, until the root mount.
The chains come from guest memory, so the walk is bounded; a path deeper than the bound
comes back prefixed with ``.../`` rather than failing. The bound is far beyond what any
path the VFS accepts in one call has (PATH_MAX is 4096 bytes, so at most 2048
components), so a real deep path under ``/tmp`` comes back whole and a ``path=/tmp/*``
rule still sees it; only a path deeper still (reached by relative opens) loses its
root-most part, and rules treat such a ``.../`` path as a possible match (fail closed).
"""

from __future__ import annotations

from vmshield.guest.kernel import Kernel

MAX_PATH_DEPTH = 4096
MAX_NAME = 255


def dentry_name(k: Kernel, dentry: int) -> str:
    """``dentry->d_name.name`` (``struct dentry *``)."""
    name_ptr = k.u64(dentry + k.member_offset("dentry", "d_name.name"))
    return k.cstring(name_ptr, MAX_NAME + 1)


def dentry_path(k: Kernel, mnt: int, dentry: int) -> str:
    """Absolute path of a dentry seen through a mount (``struct vfsmount *``)."""
    off_parent = k.member_offset("dentry", "d_parent")
    off_root = k.member_offset("vfsmount", "mnt_root")
    off_mnt = k.member_offset("mount", "mnt")
    off_mp = k.member_offset("mount", "mnt_mountpoint")
    off_mparent = k.member_offset("mount", "mnt_parent")
    parts: list[str] = []
    for _ in range(MAX_PATH_DEPTH + 64):  # the depth plus some mount crossings
        root = k.u64(mnt + off_root) if mnt else 0
        if dentry == root:
            mount = mnt - off_mnt
            parent = k.u64(mount + off_mparent)
            if not mnt or parent == mount:
                break
            dentry = k.u64(mount + off_mp)
            mnt = parent + off_mnt
            continue
        parent_dentry = k.u64(dentry + off_parent)
        if parent_dentry == dentry:
            break
        parts.append(dentry_name(k, dentry))
        dentry = parent_dentry
        if len(parts) > MAX_PATH_DEPTH:
            return ".../" + "/".join(reversed(parts))
    else:  # never reached the root: the root-most part is unknown
        return ".../" + "/".join(reversed(parts))
    return "/" + "/".join(reversed(parts))


def path_of(k: Kernel, path_va: int) -> str:
    """Absolute path of a ``struct path *``."""
    mnt = k.u64(path_va + k.member_offset("path", "mnt"))
    dentry = k.u64(path_va + k.member_offset("path", "dentry"))
    return dentry_path(k, mnt, dentry)


def file_path(k: Kernel, file: int) -> str:
    """Absolute path of a ``struct file *``."""
    return path_of(k, file + k.member_offset("file", "f_path"))


def exe_path(k: Kernel, task: int) -> str | None:
    """The executable of a task (``task->mm->exe_file``); None for kernel threads."""
    mm = k.u64(task + k.member_offset("task_struct", "mm"))
    if not mm:
        return None
    f = k.u64(mm + k.member_offset("mm_struct", "exe_file"))
    return file_path(k, f) if f else None
