"""Actions and their contracts, on each kernel: deny fails the operation with EPERM and
the guest stays healthy; kill ends the process; pause stops the VM until resumed; dump
writes a dump vmshield reads back. Bad requests change nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from vmshield.guest.kernel import Kernel
from vmshield.guest.tasks import tasks
from vmshield.hv.dumpfile import GuestDump
from vmshield.hv.target import Target

from .conftest import Lab
from .monitorlib import MonitorRun, kv

VMSHIELD = [sys.executable, "-m", "vmshield"]
EPERM = 1


@pytest.mark.parametrize("engine", ["exit", "space"])
def test_deny_open_and_connect(lab: Lab, engine: str) -> None:
    mon = MonitorRun(
        lab.name, ["-o", "file.open", "-f", "path=/etc/shadow", "--action", "deny"], engine
    )
    try:
        g = kv(lab.sh("vmstest open /etc/shadow", check=False))
        assert int(g["errno"]) == EPERM and int(g["fd"]) == -1
        ev = mon.wait_for(lambda e: e["object"] == "file.open")
        assert ev["action"] == "deny" and ev["process"]["pid"] == int(g["pid"])
        # Only what the filter names is denied; the guest stays healthy.
        assert kv(lab.sh("vmstest open /etc/passwd"))["errno"] == "0"
    finally:
        assert mon.stop() == 0, "".join(mon.stderr)
    mon = MonitorRun(lab.name, ["-o", "net.connect", "-f", "port=5601", "--action", "deny"], engine)
    try:
        c = kv(lab.sh("vmstest connect 5601", check=False))
        assert int(c["errno"]) == EPERM
        assert mon.wait_for(lambda e: e["object"] == "net.connect")["action"] == "deny"
    finally:
        assert mon.stop() == 0, "".join(mon.stderr)
    assert kv(lab.sh("vmstest connect 5601", check=False))["errno"] != str(EPERM)
    assert kv(lab.sh("vmstest open /etc/shadow"))["errno"] == "0"


@pytest.mark.parametrize("engine", ["exit", "space"])
def test_kill(lab: Lab, engine: str) -> None:
    mon = MonitorRun(
        lab.name, ["-o", "file.open", "-f", "path=/etc/shadow", "--action", "kill"], engine
    )
    try:
        res = lab.vm.run("vmstest open /etc/shadow; echo status=$?")
        ev = mon.wait_for(lambda e: e["object"] == "file.open")
        assert ev["action"] == "kill"
        assert "vmstest open" not in res.output  # it died before printing
        assert "status=137" in res.output  # 128 + SIGKILL
        pid = ev["process"]["pid"]
        assert f"/proc/{pid}" not in lab.sh("ls -d /proc/[0-9]*")
    finally:
        assert mon.stop() == 0, "".join(mon.stderr)
    assert lab.sh("echo alive").strip() == "alive"


def test_dump_is_readable_by_vmshield(lab: Lab, tmp_path: Path) -> None:
    mon = MonitorRun(
        lab.name,
        ["-o", "file.open", "-f", "path=/etc/shadow", "--action", "dump",
         "--dump-dir", str(tmp_path)],
    )  # fmt: skip
    try:
        g = kv(lab.sh("vmstest open /etc/shadow"))
        ev = mon.wait_for(lambda e: e["object"] == "file.open")
        path = Path(ev["detail"]["dump"])
        assert path.parent == tmp_path and path.exists()
    finally:
        assert mon.stop() == 0, "".join(mon.stderr)
    assert lab.sh("echo alive").strip() == "alive"
    dump = GuestDump(path)
    try:
        cpu = dump.cpus[0]
        k = Kernel.attach(dump.read, cpu.cr3, cpu.cr4)
        assert k.release == lab.sh("uname -r").strip()
        # The process that triggered the dump is in it, caught in the act.
        assert any(t.pid == int(g["pid"]) and t.comm == "vmstest" for t in tasks(k))
    finally:
        dump.close()
        path.unlink()


@pytest.mark.parametrize(
    "args,message",
    [
        (["-o", "file.nope"], "unknown isolation object 'file.nope'"),
        (["-o", "file.open", "-f", "port=22"], "file.open has no filter 'port'"),
        (["-o", "file.open", "-f", "path"], "bad filter 'path'"),
        (["-o", "process.exec", "--action", "deny"], "cannot take action 'deny'"),
        (["-o", "kfunc:no_such_function_xyz"], "none of no_such_function_xyz"),
    ],
)
def test_bad_requests_change_nothing(lab: Lab, args: list[str], message: str) -> None:
    res = subprocess.run(
        [*VMSHIELD, "monitor", lab.name, *args, "--duration", "5"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert res.returncode == 2, res.stderr
    assert message in " ".join(res.stderr.split()), res.stderr
    assert "armed" not in res.stderr
    with Target(lab.name) as t:
        assert t.qmp.running()
        assert not t.gdb_path().with_suffix(".armed.json").exists()
    assert lab.sh("echo alive").strip() == "alive"


def test_unknown_vm(lab: Lab) -> None:
    res = subprocess.run(
        [*VMSHIELD, "monitor", "no-such-vm", "-o", "file.open"], capture_output=True, text=True
    )
    assert res.returncode == 2 and "unknown VM 'no-such-vm'" in res.stderr


def test_sigkilled_monitor_leaves_a_running_guest(lab: Lab) -> None:
    mon = MonitorRun(lab.name, ["-o", "file.open"])
    os.killpg(mon.proc.pid, signal.SIGKILL)
    mon.proc.wait(10)
    # The guard (its own session) saw the monitor die: it detached, so QEMU dropped the
    # breakpoints and the guest goes on, opening files as before.
    assert kv(lab.sh("vmstest open /etc/passwd", timeout=30))["errno"] == "0"
    with Target(lab.name) as t:
        assert t.qmp.running()
        assert not t.gdb_path().with_suffix(".armed.json").exists()
    # `vmshield detach` is the manual way to clear points (e.g. if the guard was killed
    # too); on a clean VM it is a no-op that leaves the guest running.
    res = subprocess.run([*VMSHIELD, "detach", lab.name], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert lab.sh("echo alive").strip() == "alive"


def test_process_object_follows_one_process(lab: Lab) -> None:
    mon = MonitorRun(lab.name, ["-o", "process:vmstest"])
    try:
        g = kv(lab.sh("vmstest open /etc/passwd"))
        pid = int(g["pid"])
        mon.wait_for(lambda e: e["object"] == "file.open" and e["process"]["pid"] == pid)
        mon.wait_for(lambda e: e["object"] == "process.exit" and e["process"]["pid"] == pid)
        lab.sh("cat /etc/group >/dev/null")
    finally:
        assert mon.stop() == 0, "".join(mon.stderr)
    assert all(e["process"]["comm"] == "vmstest" for e in mon.events)


def test_process_object_with_deny_says_what_is_only_logged(lab: Lab) -> None:
    mon = MonitorRun(lab.name, ["-o", "process:vmstest", "--action", "deny"], engine="auto")
    try:
        g = kv(lab.sh("vmstest open /etc/passwd", check=False))
        assert int(g["errno"]) == EPERM  # file.open can be denied: it is
        ev = mon.wait_for(lambda e: e["object"] == "file.open" and e["action"] == "deny")
        assert ev["point"]["engine"] == "space"  # auto: every request fits the space
    finally:
        assert mon.stop() == 0, "".join(mon.stderr)
    note = "".join(mon.stderr)
    assert "logged only:" in note and "process.exec" in note and "cred.change" in note


# User-space points (each test arms its own monitor: one gdb client per VM).


def _file_offset(binary: str, symbol: str) -> int:
    """File offset of a symbol in the unstripped host copy of a guest program."""
    import struct
    import subprocess as sp

    va = int(sp.run(["nm", binary], capture_output=True, text=True, check=True).stdout
             .split(f" T {symbol}\n")[0].rsplit("\n", 1)[-1].split()[0], 16)  # fmt: skip
    elf = open(binary, "rb").read()  # noqa: SIM115
    (phoff,) = struct.unpack_from("<Q", elf, 0x20)
    (phnum,) = struct.unpack_from("<H", elf, 0x38)
    for i in range(phnum):
        t, _f, off, vaddr, _p, filesz, _m, _a = struct.unpack_from("<IIQQQQQQ", elf, phoff + 56 * i)
        if t == 1 and vaddr <= va < vaddr + filesz:
            return off + va - vaddr
    raise AssertionError(f"{symbol} is in no PT_LOAD of {binary}")


def test_user_space_function(lab: Lab) -> None:
    from pathlib import Path

    binary = str(Path(__file__).resolve().parents[2] / "build" / "guest" / "vmstest")
    off = _file_offset(binary, "vms_ufunc_target")
    lab.sh("vmstest sleep 300 >/dev/null 2>&1 &")  # a process running the file now
    mon = MonitorRun(lab.name, ["-o", f"ufunc:/bin/vmstest:{off:#x}"])
    try:
        g = kv(lab.sh("vmstest ufunc 7 9"))
        ev = mon.wait_for(lambda e: e["process"]["pid"] == int(g["pid"]))
        assert ev["fields"]["args"][:2] == ["0x7", "0x9"]
        assert ev["fields"]["path"] == "/bin/vmstest" and ev["fields"]["offset"] == off
        assert ev["point"]["kind"] == "user-function"
        assert g["result"] == "7009"  # the program ran on, unharmed
        lab.sh("vmstest-suid ufunc 1 2")  # same code, another file: no event
    finally:
        assert mon.stop() == 0, "".join(mon.stderr)
        lab.sh("killall vmstest", check=False)
    assert all(e["process"]["comm"] == "vmstest" for e in mon.events)


def test_user_space_function_by_symbol_in_a_pie(lab: Lab) -> None:
    # vmstest-pie is stripped but exports its target (.dynsym); its load address changes
    # every run (PIE), so the point's address comes from the running process itself.
    out = lab.sh("vmstest-pie ufunc-loop 40 > /tmp/pie.out 2>&1 & sleep 1; cat /tmp/pie.out")
    pid = int(kv(out)["pid"])
    mon = MonitorRun(lab.name, ["-o", "ufunc:/bin/vmstest-pie:vms_ufunc_target"])
    try:
        ev = mon.wait_for(lambda e: e["process"]["pid"] == pid)
        i = int(ev["fields"]["args"][0], 16)
        assert 0 <= i < 40 and ev["fields"]["args"][1] == "0x2a"
        assert ev["fields"]["symbol"] == "vms_ufunc_target"
        assert int(ev["fields"]["address"], 16) >> 40 != 0  # a randomised PIE address
    finally:
        assert mon.stop() == 0, "".join(mon.stderr)
        lab.sh("killall vmstest-pie", check=False)
