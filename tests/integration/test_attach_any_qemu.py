"""Attach to a QEMU vmshield did not start: no shared RAM, no gdbstub, only QMP."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmshield.errors import HypervisorError, VmshieldError
from vmshield.guest.kernel import Kernel
from vmshield.guest.tasks import tasks
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
