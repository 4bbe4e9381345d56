"""Lab VMs: QEMU guests vmshield boots itself, for demos, tests and benchmarks.

Each VM gets a run folder (``vmshield.paths.run_dir()/NAME``) holding its QMP, gdbstub
and serial sockets, the serial log, QEMU's pid file and ``vm.json``; its RAM is a shared
file under ``/dev/shm`` so the monitor can read it with no round trip. Guests have no
network device (``-nic none``). The accelerator is KVM only where the CPU has real
hardware virtualization (vmx/svm); everywhere else TCG.

Host hygiene: the run folder is private (``vmshield.paths.private_dir``) and its state
files are read and written without following symlinks; the RAM file is created 0600 by
vmshield before QEMU opens it (``/dev/shm`` is shared by every user, so a file someone
else placed there first, or one with another mode, is refused); and a pid from the pid
file is only trusted, or signalled, while its command line still names this VM.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from vmshield.errors import LabError, VmshieldError
from vmshield.lab.kernels import kernel_path
from vmshield.lab.serial import CommandResult, SerialConsole
from vmshield.paths import build_dir, private_dir, read_private, run_dir, write_private
from vmshield.procs import alive, is_lab_qemu

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")
READY = b"VMSHIELD_READY"


def choose_accel() -> str:
    """``kvm`` only with real hardware virtualization, else ``tcg``.

    ``/dev/kvm`` alone proves nothing: on these hosts it is a software hypervisor that
    cannot boot stock kernels (see PLATFORM.md). ``VMSHIELD_ACCEL`` overrides.
    """
    forced = os.environ.get("VMSHIELD_ACCEL")
    if forced:
        if forced not in ("kvm", "tcg"):
            raise LabError(f"VMSHIELD_ACCEL must be kvm or tcg, not {forced!r}")
        return forced
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "tcg"
    has_hw = re.search(r"^flags\s*:.*\b(vmx|svm)\b", flags, re.M) is not None
    return "kvm" if has_hw and os.access("/dev/kvm", os.R_OK | os.W_OK) else "tcg"


@dataclass
class VmInfo:
    """What ``vm.json`` records about a lab VM."""

    name: str
    kernel: str
    kernel_path: str
    memory: int
    cpus: int
    accel: str
    pid: int
    ram_path: str
    started: float


class LabVM:
    """A lab VM by name: its files, its state, its serial console."""

    def __init__(self, name: str) -> None:
        if not NAME_RE.match(name):
            raise LabError(f"bad VM name {name!r}: use 1-32 letters, digits, '_', '-' or '.'")
        self.name = name
        self.dir = run_dir() / name

    qmp_path = property(lambda self: self.dir / "qmp.sock")
    gdb_path = property(lambda self: self.dir / "gdb.sock")
    serial_path = property(lambda self: self.dir / "serial.sock")
    qga_path = property(lambda self: self.dir / "qga.sock")  # guest agent (virtio-serial)
    serial_log = property(lambda self: self.dir / "serial.log")
    pid_path = property(lambda self: self.dir / "qemu.pid")
    meta_path = property(lambda self: self.dir / "vm.json")

    def info(self) -> VmInfo:
        try:
            data = json.loads(read_private(self.meta_path))
            return VmInfo(**data)
        except FileNotFoundError:
            raise LabError(
                f"unknown VM {self.name!r} (vmshield vm list shows the lab VMs)"
            ) from None
        except (ValueError, TypeError) as e:
            raise LabError(f"VM {self.name!r}: corrupt {self.meta_path}: {e}") from e

    def pid(self) -> int | None:
        """The pid of this VM's QEMU while it runs; None once it is gone, and also when
        the pid now belongs to another process (pids are reused)."""
        try:
            pid = int(read_private(self.pid_path, 64).strip())
        except (OSError, ValueError, VmshieldError):
            return None
        return pid if is_lab_qemu(pid, self.name, self.pid_path) else None

    def running(self) -> bool:
        return self.pid() is not None

    def console(self) -> SerialConsole:
        return SerialConsole(self.serial_path, self.dir / "serial.lock")

    def run(self, command: str, timeout: float = 60.0) -> CommandResult:
        self.info()
        if not self.running():
            raise LabError(f"VM {self.name!r} is not running")
        return self.console().run(command, timeout)


def initramfs_path() -> Path:
    p = build_dir() / "initramfs.cpio.gz"
    if not p.exists():
        raise LabError(f"no guest initramfs at {p}: run `make setup`")
    return p


def ram_path(vm: LabVM) -> str:
    """The shared guest RAM file of a lab VM: per user and per run folder, so that two
    run folders (two test runs, two checkouts) may each have a VM of the same name."""
    tag = hashlib.sha256(str(vm.dir.resolve()).encode()).hexdigest()[:8]
    return f"/dev/shm/vmshield-{os.getuid()}-{tag}-{vm.name}"


def create_ram_file(path: str) -> None:
    """Create the guest RAM file 0600 as the user's own before QEMU opens it.

    ``/dev/shm`` is writable by every user (sticky): a file another user made there
    first, a symlink, or a file with another mode is refused, so guest RAM is never
    readable by others nor redirected elsewhere. Once created here the file stays
    ours (the sticky bit keeps others from replacing it)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise LabError(f"cannot create guest RAM file {path}: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)
        mode = stat.S_IMODE(st.st_mode)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or mode != 0o600:
            raise LabError(
                f"guest RAM file {path} already exists and is not a 0600 regular file of "
                f"yours (uid {st.st_uid}, mode {mode:o}): refused"
            )
    finally:
        os.close(fd)


def qemu_command(vm: LabVM, kernel: Path, memory: int, cpus: int, accel: str) -> list[str]:
    ram = ram_path(vm)
    cpu = "host" if accel == "kvm" else "max"
    return [
        "qemu-system-x86_64",
        "-name", f"vmshield-{vm.name}",
        "-machine", "q35,memory-backend=ram",
        "-accel", accel,
        "-cpu", cpu,
        "-smp", str(cpus),
        "-m", f"{memory}M",
        "-object", f"memory-backend-file,id=ram,size={memory}M,mem-path={ram},share=on",
        "-kernel", str(kernel),
        "-initrd", str(initramfs_path()),
        "-append", "console=ttyS0 panic=-1 oops=panic",
        "-display", "none",
        "-chardev",
        f"socket,id=ser0,path={vm.serial_path},server=on,wait=off,logfile={vm.serial_log}",
        "-serial", "chardev:ser0",
        "-qmp", f"unix:{vm.qmp_path},server=on,wait=off",
        "-chardev", f"socket,id=gdb0,path={vm.gdb_path},server=on,wait=off",
        "-gdb", "chardev:gdb0",
        "-device", "virtio-serial-pci",
        "-chardev", f"socket,id=qga0,path={vm.qga_path},server=on,wait=off",
        "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
        "-nic", "none",
        "-no-reboot",
        "-daemonize",
        "-pidfile", str(vm.pid_path),
    ]  # fmt: skip


def start(
    name: str, kernel: str, memory: int = 512, cpus: int = 1, timeout: float = 180.0
) -> VmInfo:
    """Boot a lab VM in the background; returns once its shell answers."""
    vm = LabVM(name)
    private_dir()  # an unusable run directory is the first thing to say
    if vm.running():
        raise LabError(f"VM {name!r} is already running")
    if not 64 <= memory <= 16384:
        raise LabError(f"--memory must be 64..16384 MiB, not {memory}")
    if not 1 <= cpus <= 64:
        raise LabError(f"--cpus must be 1..64, not {cpus}")
    kpath = kernel_path(kernel)
    if shutil.which("qemu-system-x86_64") is None:
        raise LabError("qemu-system-x86_64 is not installed: run `make setup`")
    if vm.dir.is_symlink():
        vm.dir.unlink()
    elif vm.dir.exists():
        shutil.rmtree(vm.dir)
    os.mkdir(vm.dir, 0o700)
    create_ram_file(ram_path(vm))
    accel = choose_accel()
    cmd = qemu_command(vm, kpath, memory, cpus, accel)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    if proc.returncode != 0:
        raise LabError(f"QEMU failed to start: {proc.stderr.strip()}")
    pid = vm.pid()
    if pid is None:
        raise LabError("QEMU started but wrote no pid")
    info = VmInfo(name, kernel, str(kpath), memory, cpus, accel, pid, ram_path(vm), time.time())
    write_private(vm.meta_path, json.dumps(asdict(info), indent=1).encode())
    try:
        _wait_ready(vm, timeout)
    except BaseException:
        stop(name)
        raise
    return info


def _wait_ready(vm: LabVM, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if READY in vm.serial_log.read_bytes():
                return
        except FileNotFoundError:
            pass
        if not vm.running():
            raise LabError(f"VM {vm.name!r} died during boot (see {vm.serial_log})")
        time.sleep(0.1)
    raise LabError(f"VM {vm.name!r} did not boot in {timeout:.0f} s (see {vm.serial_log})")


def stop(name: str, timeout: float = 10.0) -> bool:
    """Stop a lab VM (the QEMU we started, by its pid) and remove its files."""
    vm = LabVM(name)
    if not vm.dir.exists():
        raise LabError(f"unknown VM {name!r} (vmshield vm list shows the lab VMs)")
    ram = None
    with contextlib.suppress(LabError):
        ram = vm.info().ram_path
    pid = vm.pid()  # only while it is still this VM's QEMU
    if pid is not None:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if is_lab_qemu(pid, name, vm.pid_path):
            os.kill(pid, signal.SIGKILL)
    if ram:
        Path(ram).unlink(missing_ok=True)
    shutil.rmtree(vm.dir, ignore_errors=True)
    return pid is not None


def list_vms() -> list[tuple[VmInfo, bool]]:
    out: list[tuple[VmInfo, bool]] = []
    base = run_dir()
    if not base.exists():
        return out
    for d in sorted(base.iterdir()):
        if not (d / "vm.json").exists():
            continue
        vm = LabVM(d.name)
        try:
            out.append((vm.info(), vm.running()))
        except LabError:
            continue
    return out
