"""The daemon's event path: engine -> store and engine -> SSE client, SQLite and PostgreSQL.

A real daemon process (loopback TCP) monitors a 6.1 lab VM with ``kfunc:__x64_sys_getpid``
(filter ``comm=vmstest``, the security space when it can); the guest runs ``vmstest loop
N`` (N raw getpid() calls: a burst of N events); an SSE client reads them. Prints, for
each store: events per second from the first event's delivery to the last one stored and to
the last one the SSE client got, and the latency the daemon added to each event (p50,
p99): from the engine handing it over (``received_at``) to stored (``stored_at``) and to
received by the client. (The event's own ``time`` is not used: the security space
converts the guest's clock, which drifts from the host's under TCG.) The store is the
daemon's own SQLite file or a throwaway PostgreSQL cluster from Debian's package.
Run: ``.venv/bin/python bench/api.py [--events N] [--runs R]``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa
from rich.console import Console
from rich.table import Table

from vmshield.lab import vm as labvm
from vmshield.lab.postgres import Cluster
from vmshield.store import Store
from vmshield.store.db import database_url
from vmshield.store.schema import events as events_table

POINT = "kfunc:__x64_sys_getpid"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


class Sse(threading.Thread):
    """Collects (receive time, event) from the daemon's stream."""

    def __init__(self, url: str, token: str) -> None:
        super().__init__(daemon=True)
        self.url, self.token = url, token
        self.got: list[tuple[float, dict[str, Any]]] = []
        self.ready = threading.Event()

    def run(self) -> None:
        headers = {"Authorization": f"Bearer {self.token}"}
        with httpx.stream("GET", self.url + "/v1/events/stream", headers=headers,
                          timeout=None) as r:  # fmt: skip
            self.ready.set()
            for line in r.iter_lines():
                if line.startswith("data:"):
                    self.got.append((time.time(), json.loads(line[5:])))


def run_once(lab: str, db_url: str, state: Path, n: int, chunk: int) -> dict[str, float]:
    """One daemon, one request, ``n`` events made ``chunk`` at a time (one guest command
    per chunk: a burst when chunk == n, a slow paced stream when chunk is small)."""
    store = Store.open(db_url)
    token = store.create_token("bench")
    port = _port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "vmshield", "daemon", "--state", str(state),
           "--listen", f"tcp:127.0.0.1:{port}", "--db", db_url, "--host", "bench"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/v1/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.3)
        c = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=600)
        vm = c.post("/v1/vms", json={"target": lab}).json()
        iso = c.post(
            f"/v1/vms/{vm['id']}/isolations",
            json={"object": POINT, "filters": {"comm": "vmstest"}},
        ).json()
        if iso["state"] != "armed":
            raise SystemExit(f"not armed: {iso}")
        engine = c.get(f"/v1/vms/{vm['id']}").json()["status"]["engine"]
        sse = Sse(url, token)
        sse.start()
        sse.ready.wait(30)
        guest = labvm.LabVM(lab)
        for _ in range(n // chunk):
            guest.run(f"vmstest loop {chunk}", timeout=900)
        deadline = time.monotonic() + 600
        want = (n // chunk) * (chunk + 1)  # each run prints its pid: one more getpid()
        while len(sse.got) < want and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        with store.raw() as conn:
            rows = conn.execute(
                sa.select(
                    events_table.c.id, events_table.c.received_at, events_table.c.stored_at
                ).where(events_table.c.vm == vm["id"], events_table.c.object == POINT)
            ).all()
        c.delete(f"/v1/vms/{vm['id']}")
        c.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)
        store.close()
    got = {i: r for i, r, _ in rows}
    first = min(got.values())
    span = max(s for _, _, s in rows) - first
    store_lat = [s - r for _, r, s in rows]
    sse_lat = [t - got[e["id"]] for t, e in sse.got]
    return {
        "engine": 1.0 if engine == "space" else 0.0,
        "stored": len(rows),
        "seen": len(sse.got),
        "store_rate": len(rows) / max(1e-9, span) if chunk == n else float("nan"),
        "sse_rate": (
            len(sse.got) / max(1e-9, max(r for r, _ in sse.got) - first)
            if chunk == n
            else float("nan")
        ),
        "store_p50": _pct(store_lat, 0.5),
        "store_p99": _pct(store_lat, 0.99),
        "sse_p50": _pct(sse_lat, 0.5),
        "sse_p99": _pct(sse_lat, 0.99),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--events", type=int, default=3000)
    ap.add_argument("--paced", type=int, default=30, help="paced: this many guest commands")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--kernel", default="6.1")
    args = ap.parse_args()
    os.environ.setdefault("VMSHIELD_RUN", tempfile.mkdtemp(prefix="vmshield-bench-"))
    name = "bench-api"
    labvm.start(name, args.kernel)
    table = Table(
        title=f"burst: {args.events} getpid() events from one guest command; paced: "
        f"{args.paced} guest commands of 10 (one every ~0.2 s); median of {args.runs} runs"
    )
    for col in ("store", "load", "engine", "events stored / seen", "engine->store ev/s",
                "engine->SSE ev/s", "store p50 ms", "store p99 ms", "SSE p50 ms",
                "SSE p99 ms"):  # fmt: skip
        table.add_column(col, justify="right")
    try:
        labvm.LabVM(name).run("vmstest loop 1000", timeout=600)  # warm up TCG
        loads = {"burst": (args.events, args.events), "paced": (10 * args.paced, 10)}
        for label, (load, (n, chunk)) in itertools.product(("SQLite", "PostgreSQL"), loads.items()):
            results = []
            for _ in range(args.runs):
                with tempfile.TemporaryDirectory() as tmp:
                    if label == "SQLite":
                        url = database_url(None, Path(tmp))
                        results.append(run_once(name, url, Path(tmp), n, chunk))
                    else:
                        with Cluster() as pg:
                            url = database_url(pg, Path(tmp))
                            results.append(run_once(name, url, Path(tmp), n, chunk))

            def med(key: str, res: list[dict[str, float]] = results) -> float:
                return statistics.median(r[key] for r in res)

            table.add_row(
                label,
                load,
                "space" if med("engine") else "exit",
                f"{med('stored'):.0f} / {med('seen'):.0f}",
                _rate(med("store_rate")),
                _rate(med("sse_rate")),
                f"{med('store_p50') * 1e3:.1f}",
                f"{med('store_p99') * 1e3:.1f}",
                f"{med('sse_p50') * 1e3:.1f}",
                f"{med('sse_p99') * 1e3:.1f}",
            )
    finally:
        labvm.stop(name)
    Console(width=200).print(table)


def _rate(x: float) -> str:
    return "-" if x != x else f"{x:,.0f}"  # NaN: a paced run measures latency only


if __name__ == "__main__":
    main()
