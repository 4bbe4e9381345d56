"""The object catalog: isolation objects as data.

Each object names its candidate kernel functions (first one this kernel has wins; the
event says which fired), the fields its decoder produces, the filters it accepts and
the actions it allows. ``deny`` is allowed only where failing is the kernel's own
contract: LSM hooks (``security_*``), and for ``kfunc:`` functions on the kernel's
error-injection list.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from vmshield.errors import VmshieldError
from vmshield.guest.mm import mm_walker
from vmshield.monitor.context import HitContext

Decoder = Callable[[HitContext], dict[str, Any] | None]  # None: not this behaviour
COMMON_FILTERS = ("pid", "comm", "uid")
NON_DENY = ("log", "kill", "pause", "dump")
ALL_ACTIONS = ("log", "deny", "kill", "pause", "dump")


@dataclass(frozen=True)
class CatalogObject:
    name: str
    summary: str
    candidates: tuple[str, ...]
    fields: tuple[str, ...]
    filters: tuple[str, ...]
    actions: tuple[str, ...]
    decoder: Decoder = field(repr=False)
    # Filters applied unless the request sets the key itself (``changed=*`` to see all).
    default_filters: tuple[tuple[str, str], ...] = ()


def _exec(c: HitContext) -> dict[str, Any]:
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


MAX_ARGV_BYTES = 64 << 10


def _bprm_argv(c: HitContext, bprm: int) -> list[str]:
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


def _exit(c: HitContext) -> dict[str, Any]:
    """do_exit(long code): code is the wait status (exit code << 8 | signal)."""
    code = c.sarg(0)
    return {"code": code, "exit_code": (code >> 8) & 0xFF, "signal": code & 0x7F}


def _fork(c: HitContext) -> dict[str, Any]:
    """wake_up_new_task(struct task_struct *p): the new task."""
    t = c.tasks.info(c.arg(0))
    return {"child_pid": t.pid, "child_tgid": t.tgid, "child_comm": t.comm}


def _open(c: HitContext) -> dict[str, Any]:
    """security_file_open(struct file *file)."""
    f = c.arg(0)
    k = c.kernel
    return {
        **_path(c.file_path(f)),
        "flags": k.u32(f + c.off("file", "f_flags")),
        "mode": k.u32(f + c.off("file", "f_mode")),
    }


def _path(path: str, key: str = "path") -> dict[str, Any]:
    """A path field, flagged when its root-most part is unknown (see guest/files.py)."""
    out: dict[str, Any] = {key: path}
    if path.startswith(".../") and key == "path":
        out["path_truncated"] = True
    return out


def _unlink(c: HitContext) -> dict[str, Any]:
    """security_path_unlink(const struct path *dir, struct dentry *dentry)."""
    d = c.path_of(c.arg(0))
    return _path(d.rstrip("/") + "/" + c.dentry_name(c.arg(1)))


def _rename(c: HitContext) -> dict[str, Any]:
    """security_path_rename(old_dir, old_dentry, new_dir, new_dentry, flags)."""
    old = c.path_of(c.arg(0)).rstrip("/") + "/" + c.dentry_name(c.arg(1))
    new = c.path_of(c.arg(2)).rstrip("/") + "/" + c.dentry_name(c.arg(3))
    return {**_path(old), "new_path": new}


def _sock_addr(c: HitContext) -> dict[str, Any]:
    """security_socket_connect/bind(struct socket *, struct sockaddr *, int addrlen)."""
    return c.sockaddr(c.arg(1), c.arg(2) & 0xFFFF)


def _listen(c: HitContext) -> dict[str, Any]:
    """security_socket_listen(struct socket *sock, int backlog): local address."""
    k = c.kernel
    sk = c.u64(c.arg(0) + c.off("socket", "sk"))
    fam = k.read(sk + c.off("sock", "__sk_common.skc_family"), 2)
    port = int.from_bytes(k.read(sk + c.off("sock", "__sk_common.skc_num"), 2), "little")
    addr = k.read(sk + c.off("sock", "__sk_common.skc_rcv_saddr"), 4)
    family = int.from_bytes(fam, "little")
    return {
        "family": {2: "inet", 10: "inet6", 1: "unix"}.get(family, str(family)),
        "address": ".".join(str(b) for b in addr),
        "port": port,
        "backlog": c.sarg(1),
    }


def _creds(c: HitContext) -> dict[str, Any]:
    """commit_creds(struct cred *new): old (current->cred) and new identities."""
    k = c.kernel
    new = c.arg(0)
    old = c.u64(c.current + c.off("task_struct", "cred"))
    out: dict[str, Any] = {}
    for tag, cred in (("old", old), ("new", new)):
        for f in ("uid", "euid", "gid", "egid", "fsuid"):
            out[f"{tag}_{f}"] = k.u32(cred + c.off("cred", f))
        out[f"{tag}_cap_effective"] = f"{k.u64(cred + c.off('cred', 'cap_effective')):#x}"
    out["escalation"] = out["new_euid"] == 0 and out["old_euid"] != 0
    out["changed"] = any(
        out[f"old_{f}"] != out[f"new_{f}"]
        for f in ("uid", "euid", "gid", "egid", "fsuid", "cap_effective")
    )
    return out


def _module(c: HitContext) -> dict[str, Any]:
    """do_init_module(struct module *mod)."""
    mod = c.arg(0)
    return {"name": c.kernel.cstring(mod + c.off("module", "name"), 56)}


def _ptrace(c: HitContext) -> dict[str, Any]:
    """security_ptrace_access_check(struct task_struct *child, unsigned int mode)."""
    t = c.tasks.info(c.arg(0))
    return {"tracee_pid": t.pid, "tracee_comm": t.comm, "mode": c.arg(1) & 0xFFFFFFFF}


def _bpf(c: HitContext) -> dict[str, Any]:
    """security_bpf(int cmd, union bpf_attr *attr, unsigned int size)."""
    return {"cmd": c.sarg(0) & 0xFFFFFFFF}


def _raw(c: HitContext) -> dict[str, Any]:
    return {"args": [f"{c.arg(i):#x}" for i in range(6)]}


CATALOG: dict[str, CatalogObject] = {
    o.name: o
    for o in (
        CatalogObject("process.exec", "a program is executed",
                      ("bprm_execve", "security_bprm_check"), ("filename", "argv"),
                      (*COMMON_FILTERS, "path"), NON_DENY, _exec),
        CatalogObject("process.exit", "a process exits", ("do_exit",),
                      ("code", "exit_code", "signal"), COMMON_FILTERS, NON_DENY, _exit),
        CatalogObject("process.fork", "a new task starts", ("wake_up_new_task",),
                      ("child_pid", "child_tgid", "child_comm"), COMMON_FILTERS, NON_DENY,
                      _fork),
        CatalogObject("file.open", "a file is opened", ("security_file_open",),
                      ("path", "flags", "mode"), (*COMMON_FILTERS, "path"), ALL_ACTIONS, _open),
        CatalogObject("file.unlink", "a file is removed", ("security_path_unlink",),
                      ("path",), (*COMMON_FILTERS, "path"), ALL_ACTIONS, _unlink),
        CatalogObject("file.rename", "a file is renamed", ("security_path_rename",),
                      ("path", "new_path"), (*COMMON_FILTERS, "path"), ALL_ACTIONS, _rename),
        CatalogObject("net.connect", "a socket connects", ("security_socket_connect",),
                      ("family", "address", "port"), (*COMMON_FILTERS, "address", "port"),
                      ALL_ACTIONS, _sock_addr),
        CatalogObject("net.bind", "a socket is bound", ("security_socket_bind",),
                      ("family", "address", "port"), (*COMMON_FILTERS, "address", "port"),
                      ALL_ACTIONS, _sock_addr),
        CatalogObject("net.listen", "a socket listens", ("security_socket_listen",),
                      ("family", "address", "port", "backlog"),
                      (*COMMON_FILTERS, "address", "port"), ALL_ACTIONS, _listen),
        CatalogObject("cred.change", "a process changes identity (privilege change)",
                      ("commit_creds",),
                      ("old_uid", "new_uid", "old_euid", "new_euid", "old_gid", "new_gid",
                       "old_cap_effective", "new_cap_effective", "escalation", "changed"),
                      (*COMMON_FILTERS, "escalation", "changed"), NON_DENY, _creds,
                      (("changed", "True"),)),
        CatalogObject("module.load", "a kernel module is initialised", ("do_init_module",),
                      ("name",), COMMON_FILTERS, NON_DENY, _module),
        CatalogObject("ptrace.attach", "a process asks to trace another",
                      ("security_ptrace_access_check",), ("tracee_pid", "tracee_comm", "mode"),
                      COMMON_FILTERS, ALL_ACTIONS, _ptrace),
        CatalogObject("bpf.load", "the bpf() system call", ("security_bpf",), ("cmd",),
                      COMMON_FILTERS, ALL_ACTIONS, _bpf),
    )
}  # fmt: skip


def _host_check(c: HitContext) -> dict[str, Any] | None:
    raise VmshieldError("integrity objects are checked from the host, not at a point")


INTEGRITY_ACTIONS = ("log", "restore", "pause", "dump")
REPORT_ACTIONS = ("log", "pause", "dump")
INTEGRITY: dict[str, CatalogObject] = {
    o.name: o
    for o in (
        CatalogObject("kernel.text", "kernel code changed (core image, or module=NAME)",
                      (), ("what", "where", "address", "old", "new", "response", "count"),
                      ("module",), INTEGRITY_ACTIONS, _host_check),
        CatalogObject("kernel.rodata", "read-only kernel data changed (core image)", (),
                      ("what", "where", "address", "old", "new", "response", "count"), (),
                      INTEGRITY_ACTIONS, _host_check),
        CatalogObject("kernel.syscall_table", "a system call table entry changed (64-bit, "
                      "compat)", (), ("where", "index", "old", "new", "old_symbol",
                                      "new_symbol", "response", "count"), (),
                      INTEGRITY_ACTIONS, _host_check),
        CatalogObject("kernel.idt", "an interrupt gate or a vCPU's IDTR changed", (),
                      ("where", "index", "old", "new", "old_symbol", "new_symbol", "cpu",
                       "response", "count"), (), INTEGRITY_ACTIONS, _host_check),
        CatalogObject("cpu.control", "CR0.WP, CR4.SMEP/SMAP/UMIP or EFER.NXE cleared on a "
                      "vCPU", (), ("where", "register", "bit", "cpu", "old", "new",
                                   "response", "count"), (), INTEGRITY_ACTIONS, _host_check),
        CatalogObject("cpu.msr", "LSTAR, CSTAR, STAR or SYSENTER_* changed on a vCPU",
                      (), ("where", "register", "cpu", "old", "new", "old_symbol",
                           "new_symbol", "response", "count"), (),
                      INTEGRITY_ACTIONS, _host_check),
        CatalogObject("kernel.modules", "a module hidden from the module list (cross-view "
                      "with sysfs and the module tree), or executable memory in the module "
                      "area that nothing owns", (), ("what", "where", "module", "address",
                                                     "evidence", "pages"), ("exec",),
                      REPORT_ACTIONS, _host_check),
        CatalogObject("space.self", "the security space itself was tampered with", (),
                      ("what", "where", "address", "expected", "found", "response"), (),
                      ("log",), _host_check),
    )
}  # fmt: skip
"""Sensitive modules: objects checked from the host against a reference (see
:mod:`vmshield.monitor.integrity`), on either engine; no monitoring point."""

KFUNC = "kfunc:"


def kfunc_object(symbol: str) -> CatalogObject:
    """``kfunc:SYMBOL``: any kernel function, its six raw argument registers."""
    actions = ALL_ACTIONS if symbol.startswith("security_") else NON_DENY
    return CatalogObject(
        f"{KFUNC}{symbol}", f"kernel function {symbol}", (symbol,), ("args",),
        COMMON_FILTERS, actions, _raw,
    )  # fmt: skip


def ufunc_object(name: str) -> CatalogObject:
    """``ufunc:PATH:SYMBOL|OFFSET``: a user-space point in the processes running PATH."""

    def unbound(c: HitContext) -> dict[str, Any] | None:
        raise VmshieldError(f"{name} was not resolved against a process")

    return CatalogObject(
        name, "user-space function", (), ("path", "offset", "symbol", "address", "args"),
        COMMON_FILTERS, NON_DENY, unbound,
    )  # fmt: skip


def path_could_match(cut: str, pattern: str) -> bool:
    """Whether a path known only in part could match ``pattern``, for both engines.

    ``cut`` is either the root-most part of the path (the security space keeps that much
    of a path too long for its record) or ``.../NAME`` (a path deeper than any bound,
    whose root-most part is unknown). A filter must not be walked around with a long or
    deep path, so the answer errs towards a match: a prefix matches if some start of the
    pattern matches it whole (whatever remains of a glob can match some continuation);
    an unknown root-most part always may match.
    """
    if not cut.startswith("/"):
        return True
    return any(fnmatch.fnmatchcase(cut, pattern[:i]) for i in range(len(pattern) + 1))


def match_filter(key: str, want: str, ev_fields: dict[str, Any], proc: dict[str, Any]) -> bool:
    """One filter against an event (pid/comm/uid on the process, the rest on fields)."""
    if key in ("pid", "uid"):
        return str(proc.get(key)) == want
    if key == "comm":
        return fnmatch.fnmatchcase(str(proc.get("comm", "")), want)
    if key == "path":
        path = str(ev_fields.get("path", ev_fields.get("filename", "")))
        if ev_fields.get("path_truncated"):
            return path_could_match(path, want)
        return fnmatch.fnmatchcase(path, want)
    return fnmatch.fnmatchcase(str(ev_fields.get(key)), want)
