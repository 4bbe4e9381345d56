"""vmshield's view of the kernel held against the guest's own, on every lab kernel
(5.10, 6.1, 6.12, 7.3)."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from vmshield.guest.kernel import Kernel
from vmshield.guest.modules import modules
from vmshield.guest.symcache import SymbolCache
from vmshield.guest.tasks import current_task, tasks
from vmshield.hv.memory import GuestMemory
from vmshield.hv.target import Target

from .conftest import Lab

VMSHIELD = [sys.executable, "-m", "vmshield"]


def attach(lab: Lab, cache_dir: Path | None = None) -> tuple[Target, Kernel]:
    t = Target(lab.name).open()
    cpu = t.cpus()[0]
    cache = SymbolCache(cache_dir) if cache_dir else None
    return t, Kernel.attach(t.mem.read, cpu.cr3, cpu.cr4, cache)


def test_every_kallsyms_line_matches_the_guest(lab: Lab, tmp_path: Path) -> None:
    guest = lab.fetch("/proc/kallsyms").decode().splitlines()
    t, k = attach(lab, tmp_path)
    try:
        mine = list(k.symbols.kallsyms_lines())
    finally:
        t.close()
    assert len(guest) > 80_000
    # The guest's own table (no modules loaded) is exactly vmshield's, line by line.
    assert Counter(guest) == Counter(mine)
    assert guest == mine


def test_cached_attach_gives_the_same_model(lab: Lab, tmp_path: Path) -> None:
    t, cold = attach(lab, tmp_path)
    t.close()
    assert not cold.stats.cached
    t, warm = attach(lab, tmp_path)
    t.close()
    assert warm.stats.cached
    assert warm.symbols.addrs == cold.symbols.addrs
    assert warm.symbols.names == cold.symbols.names
    assert warm.slide == cold.slide
    assert warm.banner == lab.sh("cat /proc/version").strip()


def _guest_ps(lab: Lab) -> dict[int, tuple[int, int, str]]:
    """pid -> (ppid, uid, comm), from the guest's /proc (what its ps reads)."""
    out = lab.sh(
        "for d in /proc/[0-9]*; do "
        "p=${d#/proc/}; s=$(cat $d/status 2>/dev/null) || continue; "
        'echo "$p|$(echo "$s" | sed -n "s/^PPid:\\s*//p")|'
        '$(echo "$s" | sed -n "s/^Uid:\\s*\\([0-9]*\\).*/\\1/p")|$(cat $d/comm)"; done; '
        "echo self=$$"
    )
    rows: dict[int, tuple[int, int, str]] = {}
    for line in out.splitlines():
        if line.startswith("self="):
            continue
        pid, ppid, uid, comm = line.split("|", 3)
        rows[int(pid)] = (int(ppid), int(uid), comm)
    return rows


def test_ps_lists_the_tasks_the_guest_lists(lab: Lab) -> None:
    lab.sh("vmstest sleep 600 >/dev/null 2>&1 &")
    lab.sh("vmstest as 1000 sleep 600 >/dev/null 2>&1 &")

    # The guest's listing is made by short-lived processes (the loop's subshells, cat,
    # sed): those are gone when vmshield looks, so compare the long-lived ones. The guest
    # lists before and after vmshield walks; each of vmshield's rows must equal the
    # guest's row of one of the two instants. A workqueue worker's name carries the work
    # it last ran ("kworker/0:0-events"), which can change more than once in between:
    # for workers, the part before the work must match.
    def same(pid: int, row: tuple[int, int, str], views: list[dict[int, tuple[int, int, str]]]
             ) -> bool:  # fmt: skip
        rows = [v[pid] for v in views if pid in v]
        if row in rows:
            return True
        base = re.split(r"[-+]", row[2], maxsplit=1)[0]
        return row[2].startswith("kworker/") and any(
            r[:2] == row[:2] and re.split(r"[-+]", r[2], maxsplit=1)[0] == base for r in rows
        )

    for _attempt in range(3):
        before = _guest_ps(lab)
        t, k = attach(lab)
        try:
            t.qmp.stop()
            mine = {x.pid: (x.ppid, x.uid, x.name) for x in tasks(k)}
        finally:
            t.qmp.cont()
            t.close()
        after = _guest_ps(lab)
        transient = {p for p in before if p not in mine}
        if all(before[p][2] in ("sh", "cat", "sed") for p in transient) and all(
            same(p, r, [before, after]) for p, r in mine.items()
        ):
            break
    for pid in transient:
        assert before[pid][2] in ("sh", "cat", "sed"), f"vmshield missed {pid} {before[pid]}"
    for pid, row in mine.items():
        assert pid in before, f"vmshield lists pid {pid} {row} the guest does not"
        assert same(pid, row, [before, after]), f"pid {pid}: vmshield {row} != {before[pid]}"
    sleepers = [r for r in mine.values() if r[2] == "vmstest"]
    assert sorted(r[1] for r in sleepers) == [0, 1000]
    # Same through the CLI, as JSON.
    out = subprocess.run(
        [*VMSHIELD, "ps", lab.name, "--json"], capture_output=True, text=True, check=True
    )
    cli = {r["pid"]: (r["ppid"], r["uid"], r["comm"]) for r in json.loads(out.stdout)}
    assert sorted(r[1] for r in cli.values() if r[2] == "vmstest") == [0, 1000]


def test_modules_match_the_guest(lab: Lab) -> None:
    lab.sh("insmod /lib/modules/$(uname -r)/crc-itu-t.ko")
    guest = [line.split()[0] for line in lab.sh("cat /proc/modules").splitlines() if line]
    assert guest == ["crc_itu_t"]
    t, k = attach(lab)
    try:
        mine = [m.name for m in modules(k)]
    finally:
        t.close()
    assert mine == guest


def test_current_task_on_a_stopped_vcpu(lab: Lab) -> None:
    lab.sh("vmstest loop 2000000000 >/dev/null 2>&1 &")
    t, k = attach(lab)
    try:
        comms = []
        for _ in range(10):
            t.qmp.stop()
            from vmshield.guest.tasks import TaskReader

            comms.append(TaskReader(k).comm(current_task(k, 0)))
            t.qmp.cont()
            time.sleep(0.05)
    finally:
        t.close()
        lab.sh("killall vmstest", check=False)
    # A busy guest program is what runs most of the time; the rest is idle or the shell.
    assert comms.count("vmstest") >= 5, comms


def _ram_digest(mem: GuestMemory) -> str:
    h = hashlib.sha256()
    for start, end in mem.ranges():
        for a in range(start, end, 64 << 20):
            h.update(mem.read(a, min(64 << 20, end - a)))
    return h.hexdigest()


def test_attach_changes_no_guest_byte(lab: Lab, tmp_path: Path) -> None:
    t = Target(lab.name).open()
    try:
        t.qmp.stop()
        mem = t.mem
        before = _ram_digest(mem)
        cpu = t.cpus()[0]
        k = Kernel.attach(mem.read, cpu.cr3, cpu.cr4, SymbolCache(tmp_path))
        tasks(k)
        modules(k)
        k.btf.type_count  # noqa: B018 (reads BTF out of guest memory)
        after = _ram_digest(mem)
        assert before == after
    finally:
        t.qmp.cont()
        t.close()
    assert lab.sh("echo alive").strip() == "alive"


def test_cli_kernel_symbols_and_errors(lab: Lab) -> None:
    out = subprocess.run(
        [*VMSHIELD, "kernel", lab.name, "--json"], capture_output=True, text=True, check=True
    )
    info = json.loads(out.stdout)
    assert info["release"] == lab.sh("uname -r").strip()
    assert info["symbols"] > 80_000 and info["btf_types"] > 50_000
    assert int(info["kaslr_slide"], 16) % (2 << 20) == 0
    out = subprocess.run(
        [*VMSHIELD, "symbols", lab.name, "^commit_creds$"],
        capture_output=True,
        text=True,
        check=True,
    )
    guest = lab.sh("grep ' commit_creds$' /proc/kallsyms")
    assert out.stdout == guest
    bad = subprocess.run([*VMSHIELD, "symbols", lab.name, "("], capture_output=True, text=True)
    assert bad.returncode == 2 and "bad regex" in bad.stderr
    bad = subprocess.run([*VMSHIELD, "kernel", "no-such-vm"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown VM 'no-such-vm'" in bad.stderr
    assert re.search(r"\d", info["kaslr_slide"])
