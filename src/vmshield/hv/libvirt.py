"""A QEMU that libvirt runs, attached as ``libvirt:DOMAIN`` without stopping or editing it.

Why a separate QMP transport: libvirt holds the domain's QMP socket (QEMU serves one
client), so commands go through libvirt's monitor passthrough
(``virDomainQemuMonitorCommand``), behind the same interface as :class:`~vmshield.hv.qmp.Qmp`.
Libvirt marks the domain tainted (``custom-monitor``) the first time that is used.
QEMU's pid comes from libvirt's own record of the domain, never from a socket peer; the
gdbstub is opened through the passthrough on a socket in the domain's own directory
(QEMU runs as an unprivileged user that can write there).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from vmshield.errors import HypervisorError
from vmshield.hv.qmp import Qmp

PREFIX = "libvirt:"
DEFAULT_URI = "qemu:///system"
STATUS_DIR = Path("/run/libvirt/qemu")  # the system daemon's live domain records
DOMAINS_DIR = Path("/var/lib/libvirt/qemu")


def uri() -> str:
    """``$LIBVIRT_DEFAULT_URI``, else the system daemon."""
    return os.environ.get("LIBVIRT_DEFAULT_URI") or DEFAULT_URI


class Domain:
    """One running libvirt domain, by name or UUID."""

    def __init__(self, spec: str, connect: str | None = None) -> None:
        try:
            import libvirt
        except ImportError:
            raise HypervisorError(
                "libvirt targets need libvirt-python (pip install 'vmshield[libvirt]')"
            ) from None
        self.uri = connect or uri()
        try:
            self.conn = libvirt.open(self.uri)
        except libvirt.libvirtError as e:
            raise HypervisorError(f"cannot connect to libvirt at {self.uri}: {e}") from None
        try:
            if re.fullmatch(r"[0-9a-fA-F-]{36}", spec):
                self.dom = self.conn.lookupByUUIDString(spec)
            else:
                self.dom = self.conn.lookupByName(spec)
        except libvirt.libvirtError:
            self.conn.close()
            raise HypervisorError(f"libvirt ({self.uri}) has no domain {spec!r}") from None
        if not self.dom.isActive():
            self.conn.close()
            raise HypervisorError(f"libvirt domain {spec!r} is not running")
        self.name: str = self.dom.name()
        self.uuid: str = self.dom.UUIDString()

    def monitor(self, command: dict[str, Any]) -> dict[str, Any]:
        """One QMP command through libvirt's passthrough; the parsed reply."""
        import libvirt
        import libvirt_qemu

        try:
            text = libvirt_qemu.qemuMonitorCommand(self.dom, json.dumps(command), 0)
        except libvirt.libvirtError as e:
            raise HypervisorError(f"libvirt monitor passthrough ({self.name}): {e}") from None
        reply: dict[str, Any] = json.loads(text)
        return reply

    def pid(self) -> int:
        """QEMU's pid as libvirt recorded it when it started the domain."""
        for path in (STATUS_DIR / f"{self.name}.pid", STATUS_DIR / f"{self.name}.xml"):
            try:
                text = path.read_text()
            except OSError:
                continue
            m = re.search(r"^\s*(\d+)\s*$", text) or re.search(
                r"<domstatus[^>]*\bpid='(\d+)'", text
            )
            if m:
                return int(m[1])
        raise HypervisorError(
            f"libvirt records no pid for {self.name} under {STATUS_DIR} "
            "(a system libvirtd on this host is required for guest memory)"
        )

    def directory(self) -> Path:
        """The domain's own directory (``domain-ID-NAME``), writable by QEMU's user."""
        found = sorted(DOMAINS_DIR.glob(f"domain-{self.dom.ID()}-*"))
        if not found:
            raise HypervisorError(f"no directory of domain {self.name} under {DOMAINS_DIR}")
        return found[0]

    def close(self) -> None:
        self.conn.close()


class LibvirtQmp(Qmp):
    """QMP of a libvirt domain, through libvirt (no socket of ours)."""

    def __init__(self, domain: Domain) -> None:
        super().__init__(Path(f"{PREFIX}{domain.name}"))
        self.domain = domain

    def connect(self) -> Qmp:
        return self

    def close(self) -> None:
        """Nothing to release: libvirt keeps the monitor (the domain connection is
        closed with the target)."""

    def execute(self, command: str, **args: Any) -> Any:
        msg: dict[str, Any] = {"execute": command}
        if args:
            msg["arguments"] = args
        reply = self.domain.monitor(msg)
        if "error" in reply:
            err = reply["error"]
            raise HypervisorError(f"QMP {command}: {err.get('desc', err)}")
        return reply.get("return")
