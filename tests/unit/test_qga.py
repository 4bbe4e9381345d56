"""The guest agent client against a scripted agent on a Unix socket: replies of an
earlier client are skipped, errors and malformed answers are clean GuestAgentErrors."""

from __future__ import annotations

import base64
import json
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from vmshield.guest.transfer import agent_socket
from vmshield.hv.qga import GuestAgent, GuestAgentError

Handler = Callable[[dict[str, Any]], list[bytes]]


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Callable[[Handler], GuestAgent]]:
    path = tmp_path / "qga.sock"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(1)
    clients: list[GuestAgent] = []

    def start(handler: Handler) -> GuestAgent:
        def serve() -> None:
            conn, _ = srv.accept()
            conn.sendall(b'{"return": 999}\n')  # a stale reply of an earlier client
            buf = b""
            while True:
                try:
                    data = conn.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                buf += data
                while b"\n" in buf:
                    line, _, buf = buf.partition(b"\n")
                    for out in handler(json.loads(line)):
                        try:
                            conn.sendall(out)
                        except OSError:
                            return

        threading.Thread(target=serve, daemon=True).start()
        client = GuestAgent(path, timeout=2)
        clients.append(client)
        return client

    yield start
    for c in clients:
        c.close()
    srv.close()


def fake(msg: dict[str, Any]) -> list[bytes]:
    cmd, args = msg["execute"], msg.get("arguments", {})
    if cmd == "guest-sync":
        return [b"\xff" + json.dumps({"return": args["id"]}).encode() + b"\n"]
    if cmd == "guest-exec":
        return [b'{"return": {"pid": 42}}\n']
    if cmd == "guest-exec-status":
        data = base64.b64encode(b"hello\n").decode()
        return [
            json.dumps({"return": {"exited": True, "exitcode": 3, "out-data": data}}).encode()
            + b"\n"
        ]
    return [b'{"error": {"class": "CommandNotFound", "desc": "no such command"}}\n']


def test_sync_exec_and_errors(agent: Callable[[Handler], GuestAgent]) -> None:
    a = agent(fake)
    a.sync()
    assert a.run(["/bin/sh", "-c", "echo hello; exit 3"]) == (3, b"hello\n")
    with pytest.raises(GuestAgentError, match="no such command"):
        a.call("guest-shutdown")


def test_bad_base64_and_silence(agent: Callable[[Handler], GuestAgent]) -> None:
    def bad(msg: dict[str, Any]) -> list[bytes]:
        if msg["execute"] == "guest-exec-status":
            return [b'{"return": {"exited": true, "exitcode": 0, "out-data": "@@@"}}\n']
        if msg["execute"] == "guest-ping":
            return []  # never answers
        return fake(msg)

    a = agent(bad)
    a.sync()  # past the stale reply, as every caller does first
    with pytest.raises(GuestAgentError, match="not base64"):
        a.run(["/bin/true"])
    with pytest.raises(GuestAgentError, match="no answer"):
        a.call("guest-ping", timeout=0.3)


def test_missing_socket(tmp_path: Path) -> None:
    with pytest.raises(GuestAgentError, match=r"qga\.sock"):
        GuestAgent(tmp_path / "qga.sock")


def test_agent_socket(tmp_path: Path) -> None:
    assert agent_socket("vm1", tmp_path, "guest-agent") == tmp_path / "vm1" / "qga.sock"
    assert agent_socket("vm1", tmp_path, "guest-agent:/x/ga.sock") == Path("/x/ga.sock")
    assert agent_socket("/q/qmp.sock", tmp_path, "guest-agent") == Path("/q/qga.sock")
