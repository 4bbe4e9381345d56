"""schemathesis against the OpenAPI a real daemon serves: no request it can generate
gets a 5xx (bodies, paths, queries and headers from the schema, valid and invalid).

The daemon has no VM registered (a generated target is not a running QEMU, so every
VM-changing call must end in a problem document, never a server error); the SSE stream
is left out (it never ends by design; test_daemon covers it).
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from .daemonlib import Daemon, make_token


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(tmp_path / "state", host="fuzz")
    try:
        yield d.start()
    finally:
        d.kill()


def test_no_server_errors(daemon: Daemon) -> None:
    token = make_token(daemon.state, "fuzz", admin=True)
    st = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "schemathesis"
    if not st.exists():
        pytest.fail(f"{st} is missing: run `make setup`")
    res = subprocess.run(
        [
            str(st), "run", f"{daemon.url}/openapi.json",
            "--checks", "not_a_server_error",
            "--header", f"Authorization: Bearer {token}",
            "--exclude-path", "/v1/events/stream",
            "--max-examples", "40", "--seed", "1", "--request-timeout", "60",
        ],
        capture_output=True, text=True, timeout=900, cwd=daemon.state,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-2000:]
    assert daemon.proc is not None and daemon.proc.poll() is None


def test_limits_and_problem_documents(daemon: Daemon) -> None:
    token = make_token(daemon.state, "t")
    with daemon.client(token) as c:
        r = c.post("/v1/vms", content=b"{" + b" " * (70 * 1024) + b"}",
                   headers={"content-type": "application/json"})  # fmt: skip
        assert r.status_code == 413
        assert r.headers["content-type"].startswith("application/problem+json")
        assert "64" in r.json()["detail"] or "65536" in r.json()["detail"]
        r = c.get("/v1/nothing-here")
        assert r.status_code == 404 and r.json()["status"] == 404
        r = c.get("/v1/events", params={"cursor": "abc"})
        assert r.status_code == 422 and "cursor" in r.json()["detail"]
        r = c.post("/v1/vms", json={})
        assert r.status_code == 422 and "body.target" in r.json()["detail"]
        assert c.get("/openapi.json").json()["info"]["title"] == "vmshield"
