"""Host hygiene on a real lab VM: private run folder, 0600 RAM file made by vmshield,
the pid vmshield trusts is QEMU's, and a cached attach that checks the guest's own BTF
stays fast."""

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

from tests.integration.conftest import Lab, boot
from vmshield.guest.kernel import Kernel
from vmshield.guest.symcache import SymbolCache
from vmshield.guest.tasks import tasks
from vmshield.hv.target import Target
from vmshield.paths import run_dir
from vmshield.procs import cmdline


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    yield from boot("6.1", "hyg-6.1")


def test_run_folder_ram_file_and_pid(lab: Lab) -> None:
    info = lab.vm.info()
    for d in (run_dir(), lab.vm.dir):
        st = os.lstat(d)
        assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700, d
        assert st.st_uid == os.geteuid()
    ram = os.lstat(info.ram_path)
    assert stat.S_ISREG(ram.st_mode) and stat.S_IMODE(ram.st_mode) == 0o600
    assert ram.st_uid == os.geteuid()
    assert ram.st_size == info.memory << 20  # the file QEMU maps is the one we made
    pid = lab.vm.pid()
    assert pid == info.pid
    argv = cmdline(pid) or []
    assert os.path.basename(argv[0]).startswith("qemu-system-")
    assert f"vmshield-{lab.name}" in argv
    maps = Path(f"/proc/{pid}/maps").read_text()
    assert info.ram_path in maps


def test_cached_attach_with_btf_check_stays_fast(lab: Lab, tmp_path: Path) -> None:
    cache = SymbolCache(tmp_path)
    with Target(lab.name) as t:
        cpu = t.cpus()[0]
        k = Kernel.attach(t.mem.read, cpu.cr3, cpu.cr4, cache)
        names = {x.name for x in tasks(k)}  # resolves layouts from BTF, cached after
        cache.store(k.build)
    assert "sh" in names
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        with Target(lab.name) as t:
            cpu = t.cpus()[0]
            k = Kernel.attach(t.mem.read, cpu.cr3, cpu.cr4, cache)
            ts = tasks(k)
        times.append(time.perf_counter() - t0)
        assert k.stats.cached and "btf" not in vars(k)  # no BTF parse, but hashed:
        assert "btf_hash" in k.stats.seconds and {x.name for x in ts} >= {"sh"}
    print(f"cached attach + BTF check + ps: {min(times):.3f} s; hash {k.stats.seconds}")
    assert min(times) < 0.5


def test_guest_process_name_with_escape_sequences_is_escaped(lab: Lab) -> None:
    """A guest process renames itself to a terminal escape sequence (clear screen, set
    the window title): `vmshield ps` shows it as text, `--json` exactly."""
    # not the last command, so the shell does not exec it and keeps its new name
    lab.sh("sh -c 'printf \"\\033[2J\\033]0;pwn\\007\" > /proc/$$/comm; sleep 60; true' &")
    env = {**os.environ, "COLUMNS": "200"}  # room for the whole name in the table
    res = subprocess.run(
        [sys.executable, "-m", "vmshield", "ps", lab.name], env=env,
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "\\x1b[2J\\x1b]0;pwn\\x07" in res.stdout
    assert "\x1b" not in res.stdout and "\x07" not in res.stdout
    res = subprocess.run(
        [sys.executable, "-m", "vmshield", "ps", lab.name, "--json"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "\x1b[2J\x1b]0;pwn\x07" in {p["comm"] for p in json.loads(res.stdout)}
