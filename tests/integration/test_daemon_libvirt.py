"""A libvirt domain as a target: ``libvirt:DOMAIN`` through a real libvirtd started by
the test, a ``type='qemu'`` domain booting the lab kernel and initramfs with shared file
RAM, attached without stopping it or editing its definition. The daemon registers it,
arms a request, and the event of a guest program comes over SSE and the query API, as
for lab VMs. Fails (never skips) when libvirtd cannot start.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from vmshield.lab.vmstest import kv

from .daemonlib import Daemon, SseReader, make_token
from .libvirtlib import Libvirtd, LibvirtGuest

pytestmark = pytest.mark.vm
NAME = "vmshield-lv-test"


@pytest.fixture(scope="module")
def domain() -> Iterator[LibvirtGuest]:
    daemon = Libvirtd().start()
    try:
        guest = LibvirtGuest(NAME).start()
        try:
            yield guest
        finally:
            guest.stop()
    finally:
        daemon.stop()


def test_libvirt_domain_end_to_end(domain: LibvirtGuest, tmp_path: Path) -> None:
    d = Daemon(tmp_path / "state", host="lv")
    try:
        d.start()
        tok = make_token(d.state, "acme")
        with d.client(tok) as c:
            r = c.post("/v1/vms", json={"target": f"libvirt:{NAME}"})
            assert r.status_code == 201, r.text
            vm = r.json()
            assert vm["kernel"].startswith("6.1")
            sse = SseReader(d.url, tok)
            iso = c.post(
                f"/v1/vms/{vm['id']}/isolations",
                json={"object": "file.open", "filters": {"path": "/etc/shadow"}},
            ).json()
            assert iso["state"] == "armed", iso
            pid = int(kv(domain.sh("vmstest open /etc/shadow"))["pid"])
            ev = sse.wait_for(lambda e: e["object"] == "file.open" and e["process"]["pid"] == pid)
            sse.close()
            assert ev["fields"]["path"] == "/etc/shadow"
            page = c.get("/v1/events", params={"vm": vm["id"]}).json()["events"]
            assert ev["id"] in [e["id"] for e in page]
        assert d.term() == 0  # detached; the domain runs on
    finally:
        d.kill()
    assert "alive" in domain.sh("echo alive")
    assert kv(domain.sh("vmstest open /etc/passwd"))["errno"] == "0"
