"""Every catalog behaviour, on each kernel and through both engines (breakpoint exits
and the in-guest security space): a real guest program performs it and the event's
fields are held against what the program itself prints."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from vmshield.monitor.request import PROCESS_OBJECTS

from .conftest import Lab
from .monitorlib import MonitorRun, kv

LOGGED = list(PROCESS_OBJECTS)


@pytest.fixture(scope="module", params=["exit", "space"])
def session(lab: Lab, request: pytest.FixtureRequest) -> Iterator[tuple[Lab, MonitorRun]]:
    """One monitor with every object armed (log) for the whole module, per engine."""
    args = [a for o in LOGGED for a in ("-o", o)] + ["-o", "kfunc:__x64_sys_getppid"]
    mon = MonitorRun(lab.name, args, engine=request.param)
    try:
        yield lab, mon
    finally:
        assert mon.stop() == 0, "".join(mon.stderr)


def ev_of(mon: MonitorRun, obj: str, pid: int, **fields: Any) -> dict[str, Any]:
    def pred(e: dict[str, Any]) -> bool:
        return (
            e["object"] == obj
            and e["process"]["pid"] == pid
            and all(e["fields"].get(k) == v for k, v in fields.items())
        )

    ev = mon.wait_for(pred)
    assert ev["point"]["engine"] == mon.engine
    return ev


def test_exec(session: tuple[Lab, MonitorRun]) -> None:
    lab, mon = session
    g = kv(lab.sh("vmstest id"))
    ev = ev_of(mon, "process.exec", int(g["pid"]))
    assert ev["fields"]["filename"] == "/bin/vmstest"
    assert ev["fields"]["argv"] == ["vmstest", "id"]
    assert ev["process"]["ppid"] == int(g["ppid"])
    assert ev["point"]["symbol"] in ("bprm_execve", "security_bprm_check")


def test_exit(session: tuple[Lab, MonitorRun]) -> None:
    lab, mon = session
    g = kv(lab.sh("vmstest exit 7", check=False))
    ev = ev_of(mon, "process.exit", int(g["pid"]))
    assert ev["fields"]["exit_code"] == 7 and ev["fields"]["signal"] == 0


def test_fork(session: tuple[Lab, MonitorRun]) -> None:
    lab, mon = session
    g = kv(lab.sh("vmstest fork 3"))
    ev = ev_of(mon, "process.fork", int(g["pid"]), child_pid=int(g["child_pid"]))
    assert ev["fields"]["child_comm"] == "vmstest"


def test_open(session: tuple[Lab, MonitorRun]) -> None:
    lab, mon = session
    g = kv(lab.sh("vmstest open /etc/passwd"))
    ev = ev_of(mon, "file.open", int(g["pid"]), path="/etc/passwd")
    assert ev["process"]["uid"] == int(g["uid"])
    assert ev["fields"]["flags"] & 3 == int(g["flags"])


def test_unlink_across_a_mount(session: tuple[Lab, MonitorRun]) -> None:
    lab, mon = session
    g = kv(lab.sh("touch /tmp/vms-u; vmstest unlink /tmp/vms-u"))
    ev_of(mon, "file.unlink", int(g["pid"]), path="/tmp/vms-u")


def test_rename(session: tuple[Lab, MonitorRun]) -> None:
    lab, mon = session
    g = kv(lab.sh("touch /tmp/vms-a; vmstest rename /tmp/vms-a /tmp/vms-b"))
    ev_of(mon, "file.rename", int(g["pid"]), path="/tmp/vms-a", new_path="/tmp/vms-b")


@pytest.mark.parametrize("verb,obj", [("connect", "net.connect"), ("bind", "net.bind"),
                                      ("listen", "net.listen")])  # fmt: skip
def test_network(session: tuple[Lab, MonitorRun], verb: str, obj: str) -> None:
    lab, mon = session
    port = {"connect": 5501, "bind": 5502, "listen": 5503}[verb]
    g = kv(lab.sh(f"vmstest {verb} {port}", check=False))
    ev = ev_of(mon, obj, int(g["pid"]), port=port)
    assert ev["fields"]["address"] == g["addr"] == "127.0.0.1"
    assert ev["fields"]["family"] == "inet"
    if verb == "listen":
        assert ev["fields"]["backlog"] == int(g["backlog"])


def test_privilege_escalation(session: tuple[Lab, MonitorRun]) -> None:
    lab, mon = session
    out = lab.sh("vmstest as 1000 exec /bin/vmstest-suid id")
    before, after = (kv(line) for line in out.splitlines()[:2])
    assert before["euid"] == "1000" and after["euid"] == "0"
    ev = ev_of(mon, "cred.change", int(after["pid"]), escalation=True)
    f = ev["fields"]
    assert (f["old_uid"], f["old_euid"], f["new_uid"], f["new_euid"]) == (1000, 1000, 1000, 0)


def test_ptrace(session: tuple[Lab, MonitorRun]) -> None:
    lab, mon = session
    g = kv(lab.sh("vmstest ptrace"))
    ev_of(mon, "ptrace.attach", int(g["pid"]), tracee_pid=int(g["tracee_pid"]))


def test_bpf(session: tuple[Lab, MonitorRun]) -> None:
    lab, mon = session
    g = kv(lab.sh("vmstest bpf"))
    ev_of(mon, "bpf.load", int(g["pid"]), cmd=int(g["cmd"]))


def test_kfunc_raw_arguments(session: tuple[Lab, MonitorRun]) -> None:
    lab, mon = session
    g = kv(lab.sh("vmstest id"))
    ev = ev_of(mon, "kfunc:__x64_sys_getppid", int(g["pid"]))
    assert len(ev["fields"]["args"]) == 6
    assert ev["point"]["symbol"] == "__x64_sys_getppid"


def test_module_load(session: tuple[Lab, MonitorRun]) -> None:
    lab, mon = session
    # A real, Debian-signed module of this kernel (make setup puts it in the initramfs).
    # The lab VM serves both engines' sessions: unload what the previous one loaded.
    g = kv(
        lab.sh(
            "rmmod crc_itu_t 2>/dev/null; "
            "sh -c 'echo pid=$$; exec insmod /lib/modules/$(uname -r)/crc-itu-t.ko'"
        )
    )
    ev_of(mon, "module.load", int(g["pid"]), name="crc_itu_t")
    assert "crc_itu_t" in lab.sh("cat /proc/modules")
