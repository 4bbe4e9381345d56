"""Two daemons (two "hosts") sharing one real PostgreSQL server.

The server is Debian's ``postgresql`` package, run by the test as a throwaway cluster
(initdb + pg_ctl under a temp folder, loopback port, trust auth), as the ``postgres``
user when the tests run as root (PostgreSQL refuses to run as root). Each daemon arms
only its own host's VMs; every listing shows both with their host; an event of one host
is seen through the other daemon's query API and SSE stream (the shared store).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from vmshield.errors import LabError
from vmshield.lab.postgres import Cluster
from vmshield.lab.vmstest import kv

from .conftest import Lab, boot
from .daemonlib import Daemon, SseReader, make_token

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def postgres() -> Iterator[str]:
    try:
        with Cluster() as url:
            yield url
    except LabError as e:
        pytest.fail(str(e))


@pytest.fixture(scope="module")
def lab_a() -> Iterator[Lab]:
    yield from boot("6.1", "pga-6.1")


@pytest.fixture(scope="module")
def lab_b() -> Iterator[Lab]:
    yield from boot("6.1", "pgb-6.1")


def test_two_hosts_share_postgresql(postgres: str, lab_a: Lab, lab_b: Lab, tmp_path: Path) -> None:
    a = Daemon(tmp_path / "a", host="host-a", db=postgres)
    b = Daemon(tmp_path / "b", host="host-b", db=postgres)
    try:
        a.start()
        b.start()  # both migrate the same database at once: one waits for the other
        tok = make_token(tmp_path, "acme", db=postgres)
        with a.client(tok) as ca, b.client(tok) as cb:
            va = ca.post("/v1/vms", json={"target": lab_a.name}).json()
            vb = cb.post("/v1/vms", json={"target": lab_b.name}).json()
            assert (va["host"], vb["host"]) == ("host-a", "host-b")
            for c in (ca, cb):
                hosts = {v["id"]: v["host"] for v in c.get("/v1/vms").json()["vms"]}
                assert hosts == {va["id"]: "host-a", vb["id"]: "host-b"}
            r = ca.post(f"/v1/vms/{vb['id']}/isolations", json={"object": "file.open"})
            assert r.status_code == 409 and "host-b" in r.json()["detail"]
            flt = {"object": "file.open", "filters": {"path": "/etc/shadow"}}
            ia = ca.post(f"/v1/vms/{va['id']}/isolations", json=flt).json()
            ib = cb.post(f"/v1/vms/{vb['id']}/isolations", json=flt).json()
            assert ia["state"] == ib["state"] == "armed"
            assert ca.get("/v1/health").json()["vms"] == 1
            assert cb.get("/v1/health").json()["vms"] == 1

            sse = SseReader(a.url, tok)  # on host-a, for an event of host-b
            pid = int(kv(lab_b.sh("vmstest open /etc/shadow", check=False))["pid"])
            ev = sse.wait_for(lambda e: e["vm"] == lab_b.name and e["process"]["pid"] == pid)
            sse.close()
            page = ca.get("/v1/events", params={"vm": vb["id"]}).json()["events"]
            assert ev["id"] in [e["id"] for e in page]

        assert a.term() == 0  # host-a restarts: it re-arms only its own VM
        a.start()
        with a.client(tok) as ca, b.client(tok) as cb:
            assert ca.get(f"/v1/isolations/{ia['id']}").json()["state"] == "armed"
            assert cb.get(f"/v1/isolations/{ib['id']}").json()["state"] == "armed"
            pid = int(kv(lab_a.sh("vmstest open /etc/shadow", check=False))["pid"])
            sse = SseReader(b.url, tok, last_id=ev["id"])
            sse.wait_for(lambda e: e["vm"] == lab_a.name and e["process"]["pid"] == pid)
            sse.close()
        assert a.term() == 0 and b.term() == 0
    finally:
        a.kill()
        b.kill()
