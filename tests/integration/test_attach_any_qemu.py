"""Attach to a QEMU vmshield did not start: no shared RAM, no gdbstub, only QMP."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmshield.errors import HypervisorError, VmshieldError
from vmshield.guest.kernel import Kernel
from vmshield.guest.tasks import tasks
from vmshield.hv import target as target_mod
from vmshield.hv.target import Target
from vmshield.lab.kernels import kernel_path
from vmshield.lab.vm import initramfs_path


@pytest.fixture(scope="module")
def foreign_qemu(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A plain QEMU: private RAM, QMP only, started like any cloud stack would."""
    d = tmp_path_factory.mktemp("foreign")
    qmp = d / "qmp.sock"
    log = d / "serial.log"
    proc = subprocess.Popen(
        [
            "qemu-system-x86_64", "-machine", "q35", "-accel", "tcg", "-cpu", "max",
            "-m", "512", "-kernel", str(kernel_path("6.1")), "-initrd", str(initramfs_path()),
            "-append", "console=ttyS0 panic=-1", "-display", "none", "-nic", "none",
            "-serial", f"file:{log}", "-qmp", f"unix:{qmp},server=on,wait=off",
            "-no-reboot",
        ],
        start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (log.exists() and b"VMSHIELD_READY" in log.read_bytes()):
            assert proc.poll() is None, "QEMU exited during boot"
            assert time.monotonic() < deadline, "guest did not boot"
            time.sleep(0.2)
        yield qmp
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def test_attach_reads_ram_through_qemus_process(foreign_qemu: Path) -> None:
    with Target(str(foreign_qemu)) as t:
        assert t.memory_kind == "process"
        cpu = t.cpus()[0]
        k = Kernel.attach(t.mem.read, cpu.cr3, cpu.cr4)
        assert k.release.startswith("6.1.")
        assert len(k.symbols) > 80_000
        names = {x.name for x in tasks(k)}
        assert {"init", "kthreadd", "sh"} <= names


def test_gdbstub_is_started_through_qmp(foreign_qemu: Path) -> None:
    with Target(str(foreign_qemu)) as t:
        qmp_cpu = t.cpus()[0]
        stub = t.gdbstub()
        try:
            regs = stub.read_registers()
            assert regs.cr3 & ~0xFFF == t.cpus()[0].cr3 & ~0xFFF or regs.cr3 != 0
            assert regs.cr4 == qmp_cpu.cr4
        finally:
            stub.detach()
            stub.close()
        assert t.qmp.running()


def test_clear_errors_for_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(HypervisorError, match="no QMP socket"):
        Target(str(tmp_path / "nothing.sock")).open()
    # A Unix socket that does not speak QMP.
    path = tmp_path / "not-qmp.sock"
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(path))
    srv.listen(1)
    try:
        t0 = time.monotonic()
        with pytest.raises(VmshieldError, match="QMP greeting"):
            Target(str(path)).open()
        assert time.monotonic() - t0 < 15
    finally:
        srv.close()


class QmpProxy:
    """A QMP proxy like libvirt's virt-qemu-qmp-proxy: its own Unix socket, relaying every
    byte to QEMU's. The socket's peer (SO_PEERCRED) is this test process, not QEMU."""

    def __init__(self, path: Path, upstream: Path) -> None:
        self.path = path
        self.upstream = upstream
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        self.server.listen(4)
        self.stopping = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stopping:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            up = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            up.connect(str(self.upstream))
            for a, b in ((client, up), (up, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.stopping = True
        self.server.close()


@pytest.fixture
def proxied(foreign_qemu: Path, tmp_path: Path) -> Iterator[Path]:
    proxy = QmpProxy(tmp_path / "proxy.sock", foreign_qemu)
    try:
        yield proxy.path
    finally:
        proxy.close()


def test_memory_through_a_qmp_proxy_comes_from_qemu(proxied: Path) -> None:
    """Today's peer-pid lookup would read the proxy's (this process's) memory."""
    with Target(str(proxied)) as t:
        assert t.memory_kind == "process"
        cpu = t.cpus()[0]
        k = Kernel.attach(t.mem.read, cpu.cr3, cpu.cr4)
        assert k.release.startswith("6.1.")
        assert {"init", "sh"} <= {x.name for x in tasks(k)}


def test_cli_kernel_through_a_qmp_proxy(proxied: Path, tmp_path: Path) -> None:
    env = {**os.environ, "VMSHIELD_CACHE": str(tmp_path / "cache")}
    res = subprocess.run(
        [sys.executable, "-m", "vmshield", "kernel", str(proxied), "--json"],
        capture_output=True, text=True, timeout=120, env=env, check=False,
    )  # fmt: skip
    assert "Traceback" not in res.stderr
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["release"].startswith("6.1.") and info["memory_access"] == "process"


def test_qemu_not_found_behind_a_proxy_is_a_clear_error(
    proxied: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When no readable QEMU holds the RAM (here: the scan is made to see no process, as
    for a QEMU of another user), the attach fails with one clear error."""
    monkeypatch.setattr(target_mod, "pids", lambda: [])
    with pytest.raises(HypervisorError, match="cannot find the QEMU process behind"):
        Target(str(proxied)).open()
