"""A throwaway PostgreSQL cluster from Debian's ``postgresql`` package, for tests and
benchmarks of the daemon's shared store.

Why here: the two-daemon test and ``bench/api.py`` both need a real server started and
stopped by themselves (initdb + pg_ctl under a temp folder, a loopback port, trust
auth). PostgreSQL refuses to run as root, so as root the cluster runs as the
``postgres`` user the package creates.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType

from vmshield.errors import LabError


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Cluster:
    """``with Cluster() as url:`` -> ``postgresql://vmshield@127.0.0.1:PORT/postgres``."""

    def __init__(self) -> None:
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
        if not found:
            raise LabError("PostgreSQL server binaries missing: run `make setup` (apt postgresql)")
        self.bindir = Path(found[-1]).parent
        self.base = Path(tempfile.mkdtemp(prefix="vms-pg-"))
        self.data = self.base / "data"
        self.port = _free_port()
        self.owner: str | None = None
        if os.geteuid() == 0:
            self.owner = "postgres"
            try:
                pw = pwd.getpwnam(self.owner)
            except KeyError:
                raise LabError("user postgres missing (Debian's postgresql creates it)") from None
            os.chown(self.base, pw.pw_uid, pw.pw_gid)
        self.url = f"postgresql://vmshield@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        if self.owner:
            cmd = ["runuser", "-u", self.owner, "--", *cmd]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if res.returncode != 0:
            raise LabError(f"{args[0]} failed ({res.returncode}): {res.stderr.strip()}")

    def start(self) -> str:
        self._run("initdb", "-D", str(self.data), "-U", "vmshield", "--auth=trust", "-E", "UTF8")
        opts = f"-p {self.port} -k {self.base} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.base / "log"), "-o", opts,
                  "-w", "start")  # fmt: skip
        return self.url

    def stop(self) -> None:
        try:
            if (self.data / "postmaster.pid").exists():
                self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")
        finally:
            shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> str:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
