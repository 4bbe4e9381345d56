"""The QMP side of a QEMU: control, RAM layout, registers for any QEMU by its socket.

One class owns the QMP connection (through ``qemu.qmp``'s synchronous client); the rest
of vmshield never speaks QMP itself. Errors become :class:`HypervisorError` naming the
command that failed.
"""

from __future__ import annotations

import socket
import struct
from pathlib import Path
from types import TracebackType
from typing import Any, cast

from qemu.qmp.legacy import QEMUMonitorProtocol

from vmshield.errors import HypervisorError
from vmshield.hv.memmap import RamRange, parse_flatview


def socket_peer_pid(path: Path, timeout: float = 5.0) -> int:
    """Pid of the process serving a Unix socket (QEMU, for its QMP socket).

    Why: reading guest RAM through ``/proc/PID/mem`` needs QEMU's pid, and QMP has no
    command that tells it; the kernel does, through ``SO_PEERCRED``.
    """
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(str(path))
        cred = s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError as e:
        raise HypervisorError(f"cannot connect to QMP socket {path}: {e}") from e
    finally:
        s.close()
    pid, _uid, _gid = struct.unpack("3i", cred)
    return int(pid)


class Qmp:
    """A connected QMP monitor of one QEMU."""

    def __init__(self, path: Path | str, timeout: float = 5.0) -> None:
        self.path = Path(path)
        self._timeout = timeout
        self._mon: QEMUMonitorProtocol | None = None

    def _probe(self) -> None:
        """Wait (bounded) for QEMU's greeting before handing the socket to qemu.qmp,
        whose connect has no timeout: a socket that is not QMP, or a QMP monitor that
        another client holds (QEMU serves one at a time), must give a clear error."""
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self._timeout)
        try:
            s.connect(str(self.path))
            greeting = s.recv(4096)
        except TimeoutError:
            raise HypervisorError(
                f"{self.path} sent no QMP greeting in {self._timeout:.0f} s "
                "(not a QMP socket, or another client holds this QEMU's monitor)"
            ) from None
        except OSError as e:
            raise HypervisorError(f"cannot connect to QMP socket {self.path}: {e}") from e
        finally:
            s.close()
        if b'"QMP"' not in greeting:
            raise HypervisorError(f"{self.path} is not a QMP socket (no QMP greeting)")

    def connect(self) -> Qmp:
        if not self.path.exists():
            raise HypervisorError(f"no QMP socket at {self.path}")
        self._probe()
        mon = QEMUMonitorProtocol(str(self.path))
        try:
            mon.settimeout(self._timeout)
            mon.connect(negotiate=True)
        except Exception as e:  # qemu.qmp raises several unrelated types
            mon.close()
            raise HypervisorError(f"QMP handshake with {self.path} failed: {e}") from e
        self._mon = mon
        return self

    def close(self) -> None:
        if self._mon is not None:
            self._mon.close()
            self._mon = None

    def __enter__(self) -> Qmp:
        return self.connect() if self._mon is None else self

    def __exit__(
        self,
        et: type[BaseException] | None,
        ev: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def execute(self, command: str, **args: Any) -> Any:
        """Run one QMP command; its ``return`` value, or a HypervisorError naming it.

        Connects on demand: a long-running monitor releases QMP between uses, since
        QEMU serves one client per QMP socket and others (tests, operators) need it too.
        """
        if self._mon is None:
            self.connect()
            assert self._mon is not None
        try:
            reply = self._mon.cmd_raw(command, args or None)
        except Exception as e:
            raise HypervisorError(f"QMP {command} failed: {e}") from e
        if "error" in reply:
            err = reply["error"]
            raise HypervisorError(f"QMP {command}: {err.get('desc', err)}")
        return reply.get("return")

    def hmp(self, command_line: str) -> str:
        """A human-monitor command (``info mtree``, ``gdbserver``, ...); its text."""
        return cast(str, self.execute("human-monitor-command", **{"command-line": command_line}))

    # -- control ----------------------------------------------------------------------

    def running(self) -> bool:
        return bool(self.execute("query-status")["running"])

    def status(self) -> str:
        """QEMU's run state: ``running``, ``paused`` (QMP ``stop``), ``debug`` (stopped
        by the gdbstub), ``shutdown``, ..."""
        return str(self.execute("query-status")["status"])

    def stop(self) -> None:
        self.execute("stop")

    def cont(self) -> None:
        self.execute("cont")

    def quit(self) -> None:
        self.execute("quit")

    # -- memory -----------------------------------------------------------------------

    def ram_ranges(self) -> list[RamRange]:
        return parse_flatview(self.hmp("info mtree -f"))

    def shared_backends(self) -> dict[str, Path]:
        """RAM blocks backed by a shared file (``memory-backend-file,share=on``): id -> path.

        Only these can be mapped by the monitor for zero-round-trip access.
        """
        found: dict[str, Path] = {}
        for obj in self.execute("qom-list", path="/objects") or []:
            if "memory-backend-file" not in str(obj.get("type", "")):
                continue
            name = obj["name"]
            base = f"/objects/{name}"
            if not self.execute("qom-get", path=base, property="share"):
                continue
            found[name] = Path(self.execute("qom-get", path=base, property="mem-path"))
        return found

    def gpa_to_hva(self, gpa: int) -> int:
        """Host virtual address of a guest-physical address inside QEMU's process."""
        text = self.hmp(f"gpa2hva {gpa:#x}")
        word = text.strip().split()[-1] if text.strip() else ""
        try:
            return int(word, 16)
        except ValueError:
            raise HypervisorError(f"gpa2hva {gpa:#x}: {text.strip()!r}") from None

    # -- gdbstub ----------------------------------------------------------------------

    def start_gdbserver(self, path: Path) -> None:
        """Open a gdbstub on a Unix socket (for a QEMU started without ``-gdb``)."""
        out = self.hmp(f"gdbserver unix:{path},server=on,wait=off").strip()
        if out and "Waiting for gdb connection" not in out:
            raise HypervisorError(f"gdbserver: {out}")
