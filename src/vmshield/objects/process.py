"""Process objects: a program is executed, a process exits, a new task starts."""

from __future__ import annotations

from typing import Any

from vmshield.errors import VmshieldError
from vmshield.guest.kernel import Kernel
from vmshield.guest.mm import mm_walker
from vmshield.objects.context import PointContext
from vmshield.objects.fields import captured_path, captured_task, task_fetches
from vmshield.objects.model import COMMON_FILTERS, NON_DENY, CatalogObject
from vmshield.space import layout as L
from vmshield.space.captures import ARGV_MAX_CAPTURE, Captured, Plan, fetch

MAX_ARGV_BYTES = 64 << 10

# -- process.exec ---------------------------------------------------------------------


def _exec(c: PointContext) -> dict[str, Any]:
    """bprm_execve(struct linux_binprm *bprm, int fd, struct filename *filename, int)."""
    bprm = c.arg(0)
    k = c.kernel
    out: dict[str, Any] = {}
    fname = c.u64(bprm + c.off("linux_binprm", "filename"))
    out["filename"] = k.cstring(fname, 4096)
    try:
        out["argv"] = _bprm_argv(c, bprm)
    except VmshieldError as e:
        c.errors.append(f"argv: {e}")
    return out


def _bprm_argv(c: PointContext, bprm: int) -> list[str]:
    """argv strings, already copied by the kernel to the new program's stack (bprm->p),
    read through the new mm's page tables, page by page, bounded."""
    k = c.kernel
    argc = k.s32(bprm + c.off("linux_binprm", "argc"))
    if not 0 <= argc <= 4096:
        raise VmshieldError(f"implausible argc {argc}")
    mm = c.u64(bprm + c.off("linux_binprm", "mm"))
    pos = c.u64(bprm + c.off("linux_binprm", "p"))
    w = mm_walker(k, mm)
    buf = bytearray()
    while buf.count(0) < argc and len(buf) < MAX_ARGV_BYTES:
        n = 0x1000 - (pos & 0xFFF)
        buf += w.read(pos, n)
        pos += n
    args = bytes(buf).split(b"\0")[:argc]
    if buf.count(0) < argc:
        c.errors.append(f"argv: longer than {MAX_ARGV_BYTES} bytes, truncated")
    return [a.decode(errors="backslashreplace") for a in args]


def _exec_plan(k: Kernel) -> Plan:
    off = k.member_offset
    argv = fetch(L.F_ARGV, 0, (off("linux_binprm", "mm"), off("linux_binprm", "p"),
                               off("linux_binprm", "argc"), off("mm_struct", "pgd")),
                 ARGV_MAX_CAPTURE)  # fmt: skip
    # fetch() treats offs as a chain; ARGV reads them as four plain offsets instead.
    argv.nderef = 0
    return Plan(
        (fetch(L.F_KSTR, 0, (off("linux_binprm", "filename"), 0), 256), argv),
        _exec_captured, path_item=0, agg_key=L.K_PATH,
        optional_items=1 << 1,  # argv: its fault is reported and the event goes on
    )  # fmt: skip


def _exec_captured(c: Captured) -> dict[str, Any]:
    out: dict[str, Any] = captured_path(c, 0, "filename", "filename")
    try:
        raw = c.item(1, "argv").data
        if not raw:  # argc == 0
            out["argv"] = []
            return out
        args = raw.split(b"\0")
        if raw.endswith(b"\0"):
            args = args[:-1]
        out["argv"] = [a.decode(errors="backslashreplace") for a in args]
    except VmshieldError as e:
        c.errors.append(str(e))
    return out


# -- process.exit ---------------------------------------------------------------------


def _exit_fields(code: int) -> dict[str, Any]:
    """do_exit(long code): code is the wait status (exit code << 8 | signal)."""
    return {"code": code, "exit_code": (code >> 8) & 0xFF, "signal": code & 0x7F}


def _exit(c: PointContext) -> dict[str, Any]:
    return _exit_fields(c.sarg(0))


def _exit_plan(k: Kernel) -> Plan:
    return Plan((), lambda c: _exit_fields(c.sarg(0)), nargs=1)


# -- process.fork ---------------------------------------------------------------------


def _fork(c: PointContext) -> dict[str, Any]:
    """wake_up_new_task(struct task_struct *p): the new task."""
    t = c.tasks.info(c.arg(0))
    return {"child_pid": t.pid, "child_tgid": t.tgid, "child_comm": t.comm}


def _fork_captured(c: Captured) -> dict[str, Any]:
    pid, tgid, comm = captured_task(c, "child")
    return {"child_pid": pid, "child_tgid": tgid, "child_comm": comm}


OBJECTS = (
    CatalogObject(
        "process.exec", "a program is executed", ("bprm_execve", "security_bprm_check"),
        ("filename", "argv"), (*COMMON_FILTERS, "path"), NON_DENY, _exec, plan=_exec_plan,
    ),
    CatalogObject(
        "process.exit", "a process exits", ("do_exit",), ("code", "exit_code", "signal"),
        COMMON_FILTERS, NON_DENY, _exit, plan=_exit_plan,
    ),
    CatalogObject(
        "process.fork", "a new task starts", ("wake_up_new_task",),
        ("child_pid", "child_tgid", "child_comm"), COMMON_FILTERS, NON_DENY, _fork,
        plan=lambda k: Plan(task_fetches(k, 0), _fork_captured),
    ),
)  # fmt: skip
