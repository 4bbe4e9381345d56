"""A monitor SIGKILLed while the guest runs one of its borrowed kernel calls (security
space build, re-arm, teardown) leaves neither a frozen nor a crashed guest:
``vmshield detach`` finishes the call, puts the borrowed task back, and removes what
was built, and a new monitor works afterwards.

The kill is injected at a precise point (``VMSHIELD_FAULT``, see
:mod:`vmshield.space.borrow`): right after the vCPU was sent into the call. Three kernels
with the two allocators (``module_alloc`` on 6.1, ``execmem_alloc`` on 6.12) and 7.3's
execmem ROX cache (two more calls at build, a different one at teardown).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmshield.hv.target import Target

from .conftest import Lab, boot
from .monitorlib import MonitorRun

VMSHIELD = [sys.executable, "-m", "vmshield"]
KERNELS = ("6.1", "6.12", "7.3")


@pytest.fixture(scope="module", params=KERNELS)
def vm(request: pytest.FixtureRequest) -> Iterator[Lab]:
    yield from boot(request.param, f"midcall-{request.param}")


def _run(lab: Lab, args: list[str], fault: str | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    if fault:
        env["VMSHIELD_FAULT"] = fault
    return subprocess.run(
        [*VMSHIELD, *args], env=env, capture_output=True, text=True, timeout=300, check=False
    )


def _state_files(lab: Lab) -> list[str]:
    with Target(lab.name) as t:
        gdb = t.gdb_path()
    return sorted(
        p.name
        for p in gdb.parent.iterdir()
        if p.name.startswith(gdb.stem + ".") and p.name.endswith(".json")
    )


def _module_area(lab: Lab) -> list[str]:
    """The guest's own view of large vmalloc areas (the space's region is about 4 MiB;
    pointers show hashed but stable within a boot). Small areas come and go with
    process stacks."""
    out = lab.sh("cat /proc/vmallocinfo")
    return sorted(
        f"{w[0]} {w[1]}"
        for line in out.splitlines()
        if len(w := line.split()) > 2 and w[0].startswith("0x") and w[1].isdigit()
        and int(w[1]) >= 1 << 20 and "unpurged" not in line
    )  # fmt: skip


def _free_function(lab: Lab) -> str:
    res = _run(lab, ["symbols", lab.name, "^execmem_free$"])
    return "execmem_free" if "execmem_free" in res.stdout else "module_memfree"


def _recover_and_check(lab: Lab, before: list[str]) -> None:
    res = _run(lab, ["detach", lab.name])
    assert res.returncode == 0, res.stderr + res.stdout
    assert "finished the" in " ".join(res.stdout.split()), res.stdout
    assert lab.sh("echo alive", timeout=60).strip() == "alive"
    assert _state_files(lab) == []
    assert _module_area(lab) == before  # built, then freed: nothing left behind
    # Monitoring works afterwards, on the space.
    mon = MonitorRun(lab.name, ["-o", "file.open", "-f", "path=/etc/shadow"], "space")
    try:
        lab.sh("vmstest open /etc/shadow")
        mon.wait_for(lambda e: e["object"] == "file.open", timeout=30)
    finally:
        assert mon.stop() == 0, "".join(mon.stderr)
    assert _module_area(lab) == before


def _assert_killed(res: subprocess.CompletedProcess[str]) -> None:
    assert res.returncode == -9, (res.returncode, res.stderr)


@pytest.mark.parametrize("call", ["*", "ktime_get_mono_fast_ns"])
def test_killed_during_build(vm: Lab, call: str) -> None:
    """The allocation itself in flight (its result is freed by the recovery), or a later
    call of the build with the region already recorded."""
    before = _module_area(vm)
    _assert_killed(_run(vm, ["space", "build", vm.name], fault=f"kill-in-call:build:{call}"))
    _recover_and_check(vm, before)


@pytest.mark.parametrize("call", ["*", "permissions", "free"])
def test_killed_during_teardown(vm: Lab, call: str) -> None:
    """The first RCU wait, a permission change after the scrub, and the free itself
    (which must never run twice)."""
    before = _module_area(vm)
    res = _run(vm, ["space", "build", vm.name])
    assert res.returncode == 0, res.stderr
    assert _module_area(vm) != before
    # The pages go back read-write (module allocator) or, from 7.3's execmem ROX cache,
    # read-only + executable: a different call.
    permissions = "set_memory_rox" if vm.kernel == "7.3" else "set_memory_rw"
    fn = {"free": _free_function(vm), "permissions": permissions}.get(call, call)
    _assert_killed(_run(vm, ["space", "destroy", vm.name], fault=f"kill-in-call:teardown:{fn}"))
    _recover_and_check(vm, before)


def test_killed_during_rearm(vm: Lab) -> None:
    """A tampered config byte makes the monitor re-arm; it dies in the re-arm's call."""
    before = _module_area(vm)
    env = dict(os.environ, VMSHIELD_FAULT="kill-in-call:rearm:*")
    proc = subprocess.Popen(
        [*VMSHIELD, "monitor", vm.name, "--json", "--engine", "space", "-o", "file.open",
         "--check-interval", "0.2"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        deadline = time.monotonic() + 120
        for line in proc.stderr:
            if "armed" in line or time.monotonic() > deadline:
                break
        with Target(vm.name) as t:
            state = json.loads(t.gdb_path().with_suffix(".space.json").read_text())
            region = state["region"]
            config_pa = region["pages"][region["text_pages"]]
            old = t.mem.read(config_pa, 1)
            t.mem.write(config_pa, bytes([old[0] ^ 0xFF]))
        rc = proc.wait(60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait(10)
    assert rc == -9
    _recover_and_check(vm, before)


def test_fault_hook_is_inert_without_the_variable(vm: Lab, tmp_path: Path) -> None:
    """Build and destroy with no fault variable: nothing left, no journal."""
    before = _module_area(vm)
    assert _run(vm, ["space", "build", vm.name]).returncode == 0
    assert _run(vm, ["space", "destroy", vm.name]).returncode == 0
    assert _state_files(vm) == [] and _module_area(vm) == before
