"""The daemon end to end: a real daemon process, a real 6.1 lab VM, real guest programs.

Register, isolate, trigger in the guest, see the event over SSE and in the query API;
SIGKILL the daemon mid-way, restart it: the request is armed again, no stored event is
lost, the guest is healthy. Then every endpoint with another tenant's token (404 / not
listed) and with none (401), and a clean SIGTERM that leaves no trace in the VM.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vmshield.hv.target import Target
from vmshield.lab.vmstest import kv

from .conftest import Lab, boot
from .daemonlib import Daemon, SseReader, make_token

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    yield from boot("6.1", "dmn-6.1")


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = Daemon(tmp_path_factory.mktemp("daemon"))
    try:
        yield d
    finally:
        d.kill()


@pytest.fixture(scope="module")
def tokens(daemon: Daemon) -> dict[str, str]:
    return {t: make_token(daemon.state, t) for t in ("acme", "other")}


def _open_event(pid: int) -> Any:
    def match(ev: dict[str, Any]) -> bool:
        return (
            ev["object"] == "file.open"
            and ev["fields"].get("path") == "/etc/shadow"
            and ev["process"]["pid"] == pid
        )

    return match


def _state(daemon: Daemon, token: str, iso: str, want: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    with daemon.client(token) as c:
        while time.monotonic() < deadline:
            r = c.get(f"/v1/isolations/{iso}")
            if r.status_code == 200 and r.json()["state"] == want:
                return
            time.sleep(0.5)
        pytest.fail(f"isolation {iso} not {want}: {r.text}")


def test_register_isolate_stream_crash_restart(
    lab: Lab, daemon: Daemon, tokens: dict[str, str]
) -> None:
    tok = tokens["acme"]
    daemon.start()
    with daemon.client(tok) as c:
        r = c.post("/v1/vms", json={"target": lab.name, "name": "web-1"})
        assert r.status_code == 201, r.text
        vm = r.json()
        assert vm["kernel"].startswith("6.1") and vm["host"] == "host-a"
        assert c.post("/v1/vms", json={"target": lab.name}).status_code == 409

        sse = SseReader(daemon.url, tok)
        assert sse.status == 200
        r = c.post(
            f"/v1/vms/{vm['id']}/isolations",
            json={"object": "file.open", "filters": {"path": "/etc/shadow"}},
        )
        assert r.status_code == 201, r.text
        iso = r.json()
        assert iso["state"] == "armed", iso
        got = c.get(f"/v1/vms/{vm['id']}").json()
        assert got["status"]["armed_points"] == 1 and got["status"]["engine"] in ("space", "exit")

        # a bad request is refused with a problem document naming what is wrong
        bad = c.post(f"/v1/vms/{vm['id']}/isolations", json={"object": "file.open", "action": "x"})
        assert bad.status_code == 422
        assert bad.headers["content-type"].startswith("application/problem+json")
        assert "action" in bad.json()["detail"]

        pid = int(kv(lab.sh("vmstest open /etc/shadow", check=False))["pid"])
        ev = sse.wait_for(_open_event(pid))
        sse.close()
        assert ev["schema"] == "vmshield.event/1" and ev["request"] == iso["id"]
        page = c.get("/v1/events", params={"vm": vm["id"], "object": "file.open"}).json()
        assert ev["id"] in [e["id"] for e in page["events"]]
        metrics = c.get("/metrics").text
        assert f'vmshield_events_total{{vm="{vm["id"]}",object="file.open"}}' in metrics
        assert f'vmshield_armed_points{{vm="{vm["id"]}"}} 1' in metrics
        before = c.get("/v1/events", params={"limit": 1000}).json()["events"]

    daemon.kill()  # SIGKILL: no chance to detach; the guard / the adopted space take over
    assert lab.sh("echo alive").strip().endswith("alive")
    daemon.start()
    _state(daemon, tok, iso["id"], "armed")
    with daemon.client(tok) as c:
        after = c.get("/v1/events", params={"limit": 1000}).json()["events"]
        assert [e["id"] for e in after[: len(before)]] == [e["id"] for e in before]
        sse = SseReader(daemon.url, tok, last_id=before[-1]["id"])  # resume
        pid2 = int(kv(lab.sh("vmstest open /etc/shadow", check=False))["pid"])
        ev2 = sse.wait_for(_open_event(pid2))
        sse.close()
        assert ev2["id"] > before[-1]["id"]
        assert all(e["id"] > before[-1]["id"] for e in sse.events)
        assert kv(lab.sh("vmstest open /etc/passwd"))["errno"] == "0"

        _tenant_checks(daemon, tokens, vm["id"], iso["id"])

        assert c.delete(f"/v1/isolations/{iso['id']}").status_code == 204
        assert c.get(f"/v1/isolations/{iso['id']}").status_code == 404
        r = c.post(f"/v1/vms/{vm['id']}/isolations", json={"object": "net.connect"})
        assert r.json()["state"] == "armed"

    assert daemon.term() == 0  # SIGTERM: every monitor stopped, the VM detached
    gdb = Target(lab.name).gdb_path()
    for kind in ("armed", "space", "borrow"):
        assert not gdb.with_suffix(f".{kind}.json").exists(), kind
    assert kv(lab.sh("vmstest open /etc/shadow", check=False))["pid"]
    assert lab.sh("echo alive").strip().endswith("alive")


def _tenant_checks(daemon: Daemon, tokens: dict[str, str], vm: str, iso: str) -> None:
    """Another tenant's token: the VM, its requests and events do not exist for it.
    No token: 401 everywhere but health."""
    calls: list[tuple[str, str, dict[str, Any] | None]] = [
        ("GET", f"/v1/vms/{vm}", None),
        ("DELETE", f"/v1/vms/{vm}", None),
        ("POST", f"/v1/vms/{vm}/isolations", {"object": "file.open"}),
        ("GET", f"/v1/vms/{vm}/isolations", None),
        ("GET", f"/v1/isolations/{iso}", None),
        ("DELETE", f"/v1/isolations/{iso}", None),
        ("GET", f"/v1/events?vm={vm}", None),
        ("GET", f"/v1/events/stream?vm={vm}", None),
    ]
    with daemon.client(tokens["other"]) as c:
        for method, path, body in calls:
            r = c.request(method, path, json=body)
            assert r.status_code == 404, (method, path, r.status_code, r.text)
            assert r.headers["content-type"].startswith("application/problem+json")
        assert c.get("/v1/vms").json() == {"vms": []}
        assert c.get("/v1/events", params={"limit": 1000}).json()["events"] == []
        assert vm not in c.get("/metrics").text
        sse = SseReader(daemon.url, tokens["other"], last_id=0)
        time.sleep(2)
        sse.close()
        assert sse.status == 200 and sse.events == []
    with daemon.client(None) as c:
        for method, path, body in [
            *calls,
            ("GET", "/v1/vms", None),
            ("POST", "/v1/vms", {"target": "x"}),
            ("GET", "/v1/events", None),
            ("GET", "/metrics", None),
        ]:
            r = c.request(method, path, json=body)
            assert r.status_code == 401, (method, path, r.status_code)
            assert r.headers["www-authenticate"] == "Bearer"
        assert c.get("/v1/health").status_code == 200
    with daemon.client("vms_not-a-token") as c:
        assert c.get("/v1/vms").status_code == 401


def test_unix_socket_is_private_and_tokenless(tmp_path: Path) -> None:
    """The default listener: a Unix socket of mode 0600, local admin without a token."""
    import subprocess
    import sys

    import httpx

    sock = tmp_path / "d.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "vmshield", "daemon", "--state", str(tmp_path),
         "--listen", f"unix:{sock}", "--host", "u"],
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert (sock.stat().st_mode & 0o777) == 0o600
        t = httpx.HTTPTransport(uds=str(sock), retries=20)
        with httpx.Client(transport=t, base_url="http://d", timeout=60) as c:
            for _ in range(100):
                try:
                    if c.get("/v1/health").status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.3)
            assert c.get("/v1/vms").json() == {"vms": []}
    finally:
        proc.terminate()
        assert proc.wait(60) == 0
    assert not sock.exists()


def _cli(daemon: Daemon, token: str, *args: str) -> str:
    import subprocess
    import sys

    env = {**os.environ, "VMSHIELD_DAEMON": daemon.url, "VMSHIELD_TOKEN": token}
    res = subprocess.run(
        [sys.executable, "-m", "vmshield", *args], capture_output=True, text=True, env=env,
        timeout=600,
    )  # fmt: skip
    assert res.returncode == 0, (args, res.stdout, res.stderr)
    return res.stdout


def test_cli_talks_to_the_daemon(lab: Lab, daemon: Daemon, tokens: dict[str, str]) -> None:
    """`vmshield vms`, `isolate`, `events --follow`, `release` against the daemon."""
    import json
    import subprocess
    import sys

    tok = tokens["acme"]
    daemon.start()
    try:
        vms = json.loads(_cli(daemon, tok, "vms", "--json"))
        if not vms:
            _cli(daemon, tok, "vms", "--add", lab.name)
            vms = json.loads(_cli(daemon, tok, "vms", "--json"))
        vm = vms[0]["id"]
        assert vm in _cli(daemon, tok, "vms")
        iso = json.loads(
            _cli(daemon, tok, "isolate", vm, "--object", "file.unlink", "--filter", "path=/tmp/*")
        )
        assert iso["state"] == "armed"
        env = {**os.environ, "VMSHIELD_DAEMON": daemon.url, "VMSHIELD_TOKEN": tok}
        follow = subprocess.Popen(
            [sys.executable, "-m", "vmshield", "events", "--follow", "--object", "file.unlink",
             "--limit", "1"],
            stdout=subprocess.PIPE, text=True, env=env,
        )  # fmt: skip
        try:
            time.sleep(5)  # the follower is connected (it prints stored events first)
            lab.sh("touch /tmp/cli-x && rm /tmp/cli-x")
            deadline = time.monotonic() + 60
            assert follow.stdout is not None
            while time.monotonic() < deadline:
                ev = json.loads(follow.stdout.readline())
                if ev["fields"].get("path") == "/tmp/cli-x":
                    break
            else:
                pytest.fail("events --follow did not print the unlink")
        finally:
            follow.kill()
            follow.wait(30)
        stored = _cli(daemon, tok, "events", "--vm", vm, "--object", "file.unlink")
        assert "/tmp/cli-x" in stored
        assert "released" in _cli(daemon, tok, "release", iso["id"])
    finally:
        assert daemon.term() == 0


def test_a_vm_that_dies_is_reported(lab: Lab, daemon: Daemon, tokens: dict[str, str]) -> None:
    """QEMU killed under an armed monitor: the daemon lives on, the requests go back to
    pending with the reason, the VM shows the error. (Last test: it ends the lab VM.)"""
    import signal

    tok = tokens["acme"]
    daemon.start()
    try:
        with daemon.client(tok) as c:
            vm = c.get("/v1/vms").json()["vms"][0]
            iso = c.post(f"/v1/vms/{vm['id']}/isolations", json={"object": "file.open"}).json()
            assert iso["state"] == "armed"
            pid = lab.vm.pid()
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            _state(daemon, tok, iso["id"], "pending", timeout=60)
            got = c.get(f"/v1/isolations/{iso['id']}").json()
            assert "monitor ended" in got["reason"]
            assert c.get(f"/v1/vms/{vm['id']}").json()["status"]["last_error"]
            assert c.get("/v1/health").status_code == 200
    finally:
        assert daemon.term() == 0
