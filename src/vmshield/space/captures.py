"""What the agent captures for each catalog object, and how the host turns it into the
same event fields the exit-based engine produces.

The exit engine reads guest memory at the moment of the stop; the agent has to capture
everything at the hit, because by the time the host drains the ring the objects may be
gone (a file closed, a task exited). Each object is therefore described as a short list
of fetches (address chains from the argument registers or ``current``, BTF offsets) and
a decoder over the captured bytes. Strings are bounded (``PATH_MAX_CAPTURE``); a
truncated or faulted item becomes a decode error on the event, as in the exit engine.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from vmshield.errors import VmshieldError
from vmshield.guest.kernel import Kernel
from vmshield.guest.sockets import decode_sockaddr, family_name
from vmshield.space import layout as L

PATH_MAX_CAPTURE = 400  # bytes per path in a record (two fit, for rename)
ARGV_MAX_CAPTURE = 560
AGENT_FILTERS = frozenset({"pid", "uid", "comm", "path", "port"})
PORT_SOCKADDR, PORT_HOST_U16 = 0, 1


@dataclass
class Item:
    kind: int
    status: int
    data: bytes

    def text(self) -> str:
        return self.data.split(b"\0", 1)[0].decode(errors="backslashreplace")

    def u(self, off: int, size: int, signed: bool = False) -> int:
        if off < 0 or off + size > len(self.data):
            raise VmshieldError(f"a captured item holds {len(self.data)} bytes, not {off + size}")
        return int.from_bytes(self.data[off : off + size], "little", signed=signed)


@dataclass
class Captured:
    """A record as the decoders see it."""

    args: list[int]
    items: list[Item]
    errors: list[str] = field(default_factory=list)

    def arg(self, n: int) -> int:
        return self.args[n]

    def sarg(self, n: int) -> int:
        v = self.args[n]
        return v - (1 << 64) if v >> 63 else v

    def item(self, n: int, what: str) -> Item:
        if n >= len(self.items):
            raise VmshieldError(f"{what}: not captured")
        it = self.items[n]
        if it.status == L.S_FAULT:
            raise VmshieldError(f"{what}: the agent could not read it (fault)")
        if it.status == L.S_TRUNC:
            self.errors.append(f"{what}: longer than the record allows, truncated")
        return it


Decode = Callable[[Captured], dict[str, Any]]


@dataclass(frozen=True)
class Plan:
    """How one object is captured and decoded."""

    fetches: tuple[L.Fetch, ...]
    decode: Decode
    path_item: int = -1
    port_item: int = -1
    port_mode: int = PORT_SOCKADDR


def fetch(kind: int, base: int, offs: tuple[int, ...] = (0,), length: int = 8,
          base2: int = L.B_NONE, off2: int = 0) -> L.Fetch:  # fmt: skip
    """A fetch: ``base`` then, for every offset but the last, add and dereference."""
    if not 1 <= len(offs) <= 4:
        raise ValueError("one to four offsets")
    f = L.Fetch()
    f.kind, f.base, f.nderef, f.base2, f.len = kind, base, len(offs) - 1, base2, length
    for i, o in enumerate(offs):
        f.off[i] = o
    f.off2 = off2
    return f


def plan_for(obj: str, k: Kernel) -> Plan:
    """The capture plan of a catalog object (``kfunc:`` objects capture arguments only)."""
    off = k.member_offset
    if obj.startswith("kfunc:"):
        return Plan((), _raw)
    if obj == "process.exec":
        argv = fetch(L.F_ARGV, 0, (off("linux_binprm", "mm"), off("linux_binprm", "p"),
                                   off("linux_binprm", "argc"), off("mm_struct", "pgd")),
                     ARGV_MAX_CAPTURE)  # fmt: skip
        # fetch() treats offs as a chain; ARGV reads them as four plain offsets instead.
        argv.nderef = 0
        return Plan(
            (fetch(L.F_KSTR, 0, (off("linux_binprm", "filename"), 0), 256), argv),
            _exec, path_item=0,
        )  # fmt: skip
    if obj == "process.exit":
        return Plan((), _exit)
    if obj == "process.fork":
        return Plan(_task_fetches(k, 0), _fork)
    if obj == "file.open":
        return Plan(
            (fetch(L.F_DPATH, 0, (off("file", "f_path"),), PATH_MAX_CAPTURE),
             fetch(L.F_KMEM, 0, (off("file", "f_flags"),), 4),
             fetch(L.F_KMEM, 0, (off("file", "f_mode"),), 4)),
            _open, path_item=0,
        )  # fmt: skip
    name = off("dentry", "d_name.name")
    if obj == "file.unlink":
        return Plan((fetch(L.F_DPATH, 0, (0,), PATH_MAX_CAPTURE, 1, name),), _unlink, 0)
    if obj == "file.rename":
        return Plan(
            (fetch(L.F_DPATH, 0, (0,), PATH_MAX_CAPTURE, 1, name),
             fetch(L.F_DPATH, 2, (0,), PATH_MAX_CAPTURE, 3, name)),
            _rename, path_item=0,
        )  # fmt: skip
    if obj in ("net.connect", "net.bind"):
        return Plan((fetch(L.F_KMEM, 1, (0,), 28),), _sockaddr, port_item=0)
    if obj == "net.listen":
        sk = off("socket", "sk")
        return Plan(
            (fetch(L.F_KMEM, 0, (sk, off("sock", "__sk_common.skc_num")), 2),
             fetch(L.F_KMEM, 0, (sk, off("sock", "__sk_common.skc_family")), 2),
             fetch(L.F_KMEM, 0, (sk, off("sock", "__sk_common.skc_rcv_saddr")), 4)),
            _listen, port_item=0, port_mode=PORT_HOST_U16,
        )  # fmt: skip
    if obj == "cred.change":
        lo, hi = _cred_span(k)
        return Plan(
            (fetch(L.F_KMEM, 0, (lo,), hi - lo),
             fetch(L.F_KMEM, L.B_CURRENT, (off("task_struct", "cred"), lo), hi - lo)),
            _creds_decoder(k, lo),
        )  # fmt: skip
    if obj == "module.load":
        # 64 > MODULE_NAME_LEN (56): a name that fills its array is not "truncated".
        return Plan((fetch(L.F_KSTR, 0, (off("module", "name"),), 64),), _module)
    if obj == "ptrace.attach":
        return Plan(_task_fetches(k, 0), _ptrace)
    if obj == "bpf.load":
        return Plan((), _bpf)
    raise VmshieldError(f"{obj} cannot be monitored through the security space")


def _task_fetches(k: Kernel, base: int) -> tuple[L.Fetch, ...]:
    off = k.member_offset
    return (
        fetch(L.F_KMEM, base, (off("task_struct", "pid"),), 4),
        fetch(L.F_KMEM, base, (off("task_struct", "tgid"),), 4),
        fetch(L.F_KMEM, base, (off("task_struct", "comm"),), 16),
    )


CRED_FIELDS = ("uid", "euid", "gid", "egid", "fsuid", "cap_effective")


def _cred_span(k: Kernel) -> tuple[int, int]:
    offs = [k.member_offset("cred", f) for f in CRED_FIELDS]
    return min(offs), max(offs) + 8


def _path(c: Captured, n: int, what: str, key: str = "path") -> dict[str, Any]:
    """A captured path; one cut to fit the record keeps its root-most part and says so
    (``path_truncated``), so that path filters treat it as a possible match."""
    it = c.item(n, what)
    out: dict[str, Any] = {key: it.text()}
    if it.status == L.S_TRUNC and key in ("path", "filename"):
        out["path_truncated"] = True
    return out


def _exec(c: Captured) -> dict[str, Any]:
    out: dict[str, Any] = _path(c, 0, "filename", "filename")
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


def _exit(c: Captured) -> dict[str, Any]:
    code = c.sarg(0)
    return {"code": code, "exit_code": (code >> 8) & 0xFF, "signal": code & 0x7F}


def _task(c: Captured, prefix: str) -> tuple[int, int, str]:
    pid = c.item(0, f"{prefix} pid").u(0, 4, signed=True)
    tgid = c.item(1, f"{prefix} tgid").u(0, 4, signed=True)
    return pid, tgid, c.item(2, f"{prefix} comm").text()


def _fork(c: Captured) -> dict[str, Any]:
    pid, tgid, comm = _task(c, "child")
    return {"child_pid": pid, "child_tgid": tgid, "child_comm": comm}


def _open(c: Captured) -> dict[str, Any]:
    return {
        **_path(c, 0, "path"),
        "flags": c.item(1, "flags").u(0, 4),
        "mode": c.item(2, "mode").u(0, 4),
    }


def _unlink(c: Captured) -> dict[str, Any]:
    return _path(c, 0, "path")


def _rename(c: Captured) -> dict[str, Any]:
    return {**_path(c, 0, "path"), "new_path": c.item(1, "new path").text()}


def _sockaddr(c: Captured) -> dict[str, Any]:
    raw = c.item(0, "sockaddr").data[: max(2, min(c.arg(2) & 0xFFFF, 28))]
    return decode_sockaddr(raw)


def _listen(c: Captured) -> dict[str, Any]:
    addr = c.item(2, "address").data[:4]
    if len(addr) != 4:
        raise VmshieldError("address: short capture")
    return {
        "family": family_name(c.item(1, "family").u(0, 2)),
        "address": ".".join(str(b) for b in addr),
        "port": c.item(0, "port").u(0, 2),
        "backlog": c.sarg(1),
    }


def _creds_decoder(k: Kernel, lo: int) -> Decode:
    offs = {f: k.member_offset("cred", f) - lo for f in CRED_FIELDS}

    def decode(c: Captured) -> dict[str, Any]:
        new, old = c.item(0, "new cred"), c.item(1, "old cred")
        out: dict[str, Any] = {}
        for tag, it in (("old", old), ("new", new)):
            for f in CRED_FIELDS[:-1]:
                out[f"{tag}_{f}"] = it.u(offs[f], 4)
            out[f"{tag}_cap_effective"] = f"{it.u(offs['cap_effective'], 8):#x}"
        out["escalation"] = out["new_euid"] == 0 and out["old_euid"] != 0
        out["changed"] = any(out[f"old_{f}"] != out[f"new_{f}"] for f in CRED_FIELDS)
        return out

    return decode


def _module(c: Captured) -> dict[str, Any]:
    return {"name": c.item(0, "name").text()}


def _ptrace(c: Captured) -> dict[str, Any]:
    pid, _tgid, comm = _task(c, "tracee")
    return {"tracee_pid": pid, "tracee_comm": comm, "mode": c.arg(1) & 0xFFFFFFFF}


def _bpf(c: Captured) -> dict[str, Any]:
    return {"cmd": c.sarg(0) & 0xFFFFFFFF}


def _raw(c: Captured) -> dict[str, Any]:
    return {"args": [f"{a:#x}" for a in c.args]}


def parse_items(data: bytes, count: int) -> list[Item]:
    """The items of a record's data area; bounded by the area and ``count``."""
    items: list[Item] = []
    pos = 0
    for _ in range(min(count, L.MAX_FETCH)):
        if pos + 4 > len(data):
            break
        n, kind, status = struct.unpack_from("<HBB", data, pos)
        if pos + 4 + n > len(data):
            items.append(Item(kind, L.S_FAULT, b""))
            break
        items.append(Item(kind, status, data[pos + 4 : pos + 4 + n]))
        pos += (4 + n + 7) & ~7
    return items
