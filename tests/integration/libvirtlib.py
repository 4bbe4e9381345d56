"""A real libvirtd for the tests (no systemd here) and a transient domain booting the lab
kernel and initramfs.

Without systemd, the test does what the libvirt-daemon package's install scripts and
units would: the ``libvirt-qemu`` user and groups, libvirt's directories, then
``virtlogd -d`` and ``libvirtd -d``; it stops what it started by the pids in their pid
files. A libvirtd that was already running is used and left running.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from vmshield.lab.kernels import KNOWN_KERNELS, kernel_path
from vmshield.lab.serial import SerialConsole
from vmshield.lab.vm import initramfs_path

SOCK = Path("/run/libvirt/libvirt-sock")
PIDS = {"libvirtd": Path("/run/libvirtd.pid"), "virtlogd": Path("/run/virtlogd.pid")}
QEMU_USER = "libvirt-qemu"
DIRS = [Path("/var/log/libvirt/qemu"), Path("/var/cache/libvirt/qemu"),
        Path("/var/lib/libvirt/qemu")]  # fmt: skip
BOOT = Path("/var/lib/libvirt/boot")


def _alive(pidfile: Path) -> int | None:
    try:
        pid = int(pidfile.read_text().strip())
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None


def _sh(*cmd: str) -> None:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if res.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} failed: {res.stderr.strip()}")


class Libvirtd:
    def __init__(self) -> None:
        self.started: list[str] = []

    def start(self) -> Libvirtd:
        if os.geteuid() != 0:
            pytest.fail("the libvirt test runs a system libvirtd: run it as root (CI does)")
        for tool in ("libvirtd", "virtlogd"):
            if shutil.which(tool) is None:
                pytest.fail(f"{tool} missing: run `make setup` (apt libvirt-daemon)")
        for group in ("kvm", QEMU_USER):
            try:
                grp.getgrnam(group)
            except KeyError:
                _sh("groupadd", "--system", group)
        try:
            pwd.getpwnam(QEMU_USER)
        except KeyError:
            _sh("useradd", "--system", "-g", QEMU_USER, "-G", "kvm", "-d", "/var/lib/libvirt",
                "-s", "/usr/sbin/nologin", QEMU_USER)  # fmt: skip
        pw = pwd.getpwnam(QEMU_USER)
        for d in DIRS:
            d.mkdir(parents=True, exist_ok=True)
            os.chown(d, pw.pw_uid, pw.pw_gid)
            d.chmod(0o750)
        BOOT.mkdir(parents=True, exist_ok=True)
        for name in ("virtlogd", "libvirtd"):
            if _alive(PIDS[name]) is None:
                _sh(name, "-d")
                self.started.append(name)
        deadline = time.monotonic() + 60
        while not SOCK.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        if not SOCK.exists():
            self.stop()
            pytest.fail(f"libvirtd started but {SOCK} did not appear")
        return self

    def stop(self) -> None:
        for name in reversed(self.started):
            pid = _alive(PIDS[name])
            if pid is not None:
                os.kill(pid, signal.SIGTERM)
                deadline = time.monotonic() + 30
                while _alive(PIDS[name]) == pid and time.monotonic() < deadline:
                    time.sleep(0.2)
        self.started = []


def domain_xml(name: str, kernel: Path, initrd: Path, serial: Path) -> str:
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>512</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>console=ttyS0 panic=-1 oops=panic</cmdline>
  </os>
  <cpu mode='maximum'/>
  <memoryBacking><source type='file'/><access mode='shared'/></memoryBacking>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <serial type='unix'>
      <source mode='bind' path='{serial}'/>
      <target port='0'/>
    </serial>
    <memballoon model='none'/>
  </devices>
</domain>"""


class LibvirtGuest:
    """A transient domain (``virsh create``) on the lab kernel and initramfs."""

    def __init__(self, name: str, kernel: str = "6.1") -> None:
        assert kernel in KNOWN_KERNELS
        self.name = name
        self.kernel = BOOT / f"vmshield-{kernel}.vmlinuz"
        self.initrd = BOOT / "vmshield-initramfs.cpio.gz"
        shutil.copy(kernel_path(kernel), self.kernel)
        shutil.copy(initramfs_path(), self.initrd)
        for f in (self.kernel, self.initrd):
            f.chmod(0o644)
        self.serial = Path("/var/lib/libvirt/qemu") / f"{name}.serial"
        self.lock = Path(tempfile.mkdtemp(prefix="vms-lv-")) / "serial.lock"
        self.console = SerialConsole(self.serial, self.lock)

    def start(self, timeout: float = 180) -> LibvirtGuest:
        xml = Path(self.lock.parent / "domain.xml")
        xml.write_text(domain_xml(self.name, self.kernel, self.initrd, self.serial))
        _sh("virsh", "-c", "qemu:///system", "create", str(xml))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.serial.exists():
                with contextlib.suppress(Exception):
                    if "ready" in self.console.run("echo ready", timeout=10).output:
                        return self
            time.sleep(1)
        self.stop()
        pytest.fail(f"libvirt domain {self.name} did not boot in {timeout}s")

    def sh(self, cmd: str, timeout: float = 60) -> str:
        return self.console.run(cmd, timeout).output

    def stop(self) -> None:
        subprocess.run(["virsh", "-c", "qemu:///system", "destroy", self.name],
                       capture_output=True, timeout=120)  # fmt: skip
        shutil.rmtree(self.lock.parent, ignore_errors=True)
