"""Host hygiene against hostile local users: the run directory, its files, the RAM file
and the pids vmshield signals. Real files, real processes; no VM needed."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmshield import paths
from vmshield.errors import LabError, VmshieldError
from vmshield.lab import vm as labvm
from vmshield.paths import RunDirError, private_dir, read_private, run_dir, write_private
from vmshield.procs import is_lab_qemu

NOBODY = 65534


def mode(p: Path) -> int:
    return stat.S_IMODE(os.lstat(p).st_mode)


# ------------------------------------------------------------------ run directory


def test_default_run_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VMSHIELD_RUN", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1000")
    assert run_dir() == Path("/run/user/1000/vmshield")
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert run_dir() == Path("/run/vmshield")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert run_dir() == Path("/tmp/vmshield-1000")  # per user, and checked before use
    assert run_dir() != Path("/tmp/vmshield")


def test_private_dir_is_created_0700(tmp_path: Path) -> None:
    d = private_dir(tmp_path / "a" / "run")
    assert d.is_dir() and mode(d) == 0o700 and os.lstat(d).st_uid == os.geteuid()


def test_private_dir_tightens_a_readable_dir_of_ours(tmp_path: Path) -> None:
    d = tmp_path / "run"
    d.mkdir(mode=0o755)
    os.chmod(d, 0o755)
    private_dir(d)
    assert mode(d) == 0o700


@pytest.mark.parametrize("bad_mode", [0o777, 0o775, 0o757, 0o1777])
def test_private_dir_refuses_a_dir_others_can_write(tmp_path: Path, bad_mode: int) -> None:
    d = tmp_path / "run"
    d.mkdir()
    os.chmod(d, bad_mode)
    with pytest.raises(RunDirError, match="writable by others"):
        private_dir(d)


def test_private_dir_refuses_a_symlink(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    (tmp_path / "run").symlink_to(elsewhere)
    with pytest.raises(RunDirError, match="not a directory"):
        private_dir(tmp_path / "run")


def test_private_dir_refuses_a_dir_someone_else_made_first(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.fail("this test creates a directory owned by another user: run it as root")
    d = tmp_path / "run"
    d.mkdir(mode=0o700)
    os.chown(d, NOBODY, NOBODY)
    with pytest.raises(RunDirError, match=f"belongs to uid {NOBODY}"):
        private_dir(d)


def test_uncreatable_run_dir_is_one_clear_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(RunDirError, match="cannot create the run directory"):
        private_dir(tmp_path / "file" / "run")


# ------------------------------------------------------------------ state files


def test_state_files_are_0600_and_never_follow_symlinks(tmp_path: Path) -> None:
    f = tmp_path / "vm.json"
    write_private(f, b'{"a": 1}')
    assert mode(f) == 0o600 and read_private(f) == b'{"a": 1}'
    write_private(f, b"{}")  # replaced, not appended
    assert read_private(f) == b"{}"
    victim = tmp_path / "victim"
    victim.write_text("precious")
    link = tmp_path / "qemu.pid"
    link.symlink_to(victim)
    with pytest.raises(RunDirError, match="symlink"):
        write_private(link, b"123")
    with pytest.raises(RunDirError, match="symlink"):
        read_private(link)
    assert victim.read_text() == "precious"


def test_state_file_that_is_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "qemu.pid"
    os.mkfifo(fifo)
    t0 = time.monotonic()
    with pytest.raises(RunDirError, match="not a regular file"):
        read_private(fifo)
    assert time.monotonic() - t0 < 1


# ------------------------------------------------------------------ RAM file


def test_ram_file_is_created_0600(tmp_path: Path) -> None:
    ram = tmp_path / "vmshield-0-x"
    old = os.umask(0)  # even with a permissive umask
    try:
        labvm.create_ram_file(str(ram))
    finally:
        os.umask(old)
    st = os.lstat(ram)
    assert stat.S_ISREG(st.st_mode) and mode(ram) == 0o600 and st.st_uid == os.geteuid()
    labvm.create_ram_file(str(ram))  # our own 0600 file (a stopped VM's) is reused


def test_ram_file_with_another_mode_is_refused(tmp_path: Path) -> None:
    ram = tmp_path / "ram"
    ram.write_bytes(b"")
    os.chmod(ram, 0o644)
    with pytest.raises(LabError, match="mode 644"):
        labvm.create_ram_file(str(ram))


def test_ram_file_of_another_user_is_refused(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.fail("this test creates a file owned by another user: run it as root")
    ram = tmp_path / "ram"
    ram.write_bytes(b"")
    os.chmod(ram, 0o600)
    os.chown(ram, NOBODY, NOBODY)
    with pytest.raises(LabError, match=f"uid {NOBODY}"):
        labvm.create_ram_file(str(ram))


def test_ram_file_symlink_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.write_bytes(b"")
    os.chmod(target, 0o600)
    (tmp_path / "ram").symlink_to(target)
    with pytest.raises(LabError, match="cannot create guest RAM file"):
        labvm.create_ram_file(str(tmp_path / "ram"))


# ------------------------------------------------------------------ pids


@pytest.fixture
def run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "run"
    monkeypatch.setenv("VMSHIELD_RUN", str(d))
    return private_dir()


def sleeper(*extra: str) -> subprocess.Popen[bytes]:
    """A process that lives until killed; ``extra`` lands on its command line."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", *extra])


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=10)


def fake_vm(run: Path, name: str, pid: int) -> labvm.LabVM:
    vm = labvm.LabVM(name)
    os.mkdir(vm.dir, 0o700)
    write_private(vm.pid_path, f"{pid}\n".encode())
    info = labvm.VmInfo(name, "6.1", "/k", 64, 1, "tcg", pid, str(run / "no-ram"), 0.0)
    write_private(vm.meta_path, json.dumps(info.__dict__).encode())
    return vm


def test_stop_does_not_signal_a_reused_pid(run: Path, procs: list[subprocess.Popen[bytes]]) -> None:
    other = sleeper()  # the pid file names it, but it is not this VM's QEMU
    procs.append(other)
    vm = fake_vm(run, "h-reused", other.pid)
    assert vm.pid() is None and not vm.running()
    assert labvm.stop("h-reused") is False
    time.sleep(0.2)
    assert other.poll() is None  # still alive: never signalled
    assert not vm.dir.exists()


def test_stop_signals_the_process_it_started(
    run: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    vm_dir = run / "h-mine"
    qemu = sleeper("-name", "vmshield-h-mine", "-pidfile", str(vm_dir / "qemu.pid"))
    procs.append(qemu)
    time.sleep(0.1)
    vm = fake_vm(run, "h-mine", qemu.pid)
    assert vm.pid() == qemu.pid
    assert is_lab_qemu(qemu.pid, "h-mine", vm.pid_path)
    assert not is_lab_qemu(qemu.pid, "h-other", vm.pid_path)  # another VM's name
    assert not is_lab_qemu(qemu.pid, "h-mine", Path("/elsewhere/qemu.pid"))  # another run dir
    assert labvm.stop("h-mine") is True
    assert qemu.wait(timeout=10) is not None


def test_pid_file_through_a_symlink_is_not_trusted(
    run: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    vm_dir = run / "h-link"
    qemu = sleeper("-name", "vmshield-h-link", "-pidfile", str(vm_dir / "qemu.pid"))
    procs.append(qemu)
    vm = fake_vm(run, "h-link", qemu.pid)
    elsewhere = run.parent / "pid"
    elsewhere.write_text(str(qemu.pid))
    vm.pid_path.unlink()
    vm.pid_path.symlink_to(elsewhere)
    assert vm.pid() is None


def test_errors_are_vmshield_errors() -> None:
    assert issubclass(RunDirError, VmshieldError)
    assert paths.RunDirError is RunDirError


def test_maps_cover_and_qemu_binary_checks() -> None:
    import ctypes
    import mmap

    from vmshield.procs import exe_name, is_qemu_binary, maps_cover

    m = mmap.mmap(-1, 4 << 20)
    try:
        view = ctypes.c_char.from_buffer(m)
        addr = ctypes.addressof(view)
        del view  # no export left, so the mapping can be closed
        me = os.getpid()
        assert maps_cover(me, [(addr, 4 << 20)])
        assert maps_cover(me, [(addr + 4096, 8192)])
        assert not maps_cover(me, [(0x1000, 4096)])  # nothing is mapped at page 1
        assert not maps_cover(me, [(addr, 1 << 46)])
        assert not maps_cover(2**22 + 7, [(addr, 1)])  # no such process
    finally:
        m.close()
    assert exe_name(os.getpid()) is not None and not is_qemu_binary(os.getpid())
