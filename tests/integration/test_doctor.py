"""``vmshield doctor``: what it says about each lab kernel, held against the guest's own
view (its Meltdown mitigation, its release) and against what the other tests show works
(every catalog object on both engines)."""

from __future__ import annotations

import json
import subprocess
import sys

from .conftest import Lab

VMSHIELD = [sys.executable, "-m", "vmshield"]
ENCODING = {"5.10": "relative-percpu", "6.1": "relative-percpu", "6.12": "relative-percpu"}
IBT = {"5.10": False, "6.1": False, "6.12": True, "7.3": True}


def test_doctor(lab: Lab) -> None:
    res = subprocess.run(
        [*VMSHIELD, "doctor", lab.name, "--json"], capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    rows = {r["what"]: r for r in info["kernel"]}
    assert rows["kernel"]["found"] == lab.sh("uname -r").strip()
    assert rows["symbol source"]["found"] == "kallsyms"
    layout = rows["kallsyms layout"]["found"]
    assert layout.startswith(ENCODING.get(lab.kernel, "place-relative"))
    assert int(rows["BTF"]["found"].split()[0]) > 50_000
    meltdown = lab.sh("cat /sys/devices/system/cpu/vulnerabilities/meltdown", check=False)
    assert rows["PTI"]["found"] == ("on" if "PTI" in meltdown else "off"), meltdown
    assert rows["IBT"]["found"].startswith("built in" if IBT[lab.kernel] else "not built in")
    assert rows["TIF_SIGPENDING"]["found"] == ("1" if lab.kernel == "7.3" else "2")
    assert rows["security space"]["found"] == "available", rows["security space"]
    assert (
        "0f 1f 44 00 00" in rows["ftrace NOP"]["found"]
        or "66 66 66 66 90" in (rows["ftrace NOP"]["found"])
    )
    objects = {o["object"]: o for o in info["objects"]}
    assert "file.open" in objects and "kfunc:__x64_sys_getpid" in objects
    for o in objects.values():
        assert (o["exit"], o["space"], o["why_not"]) == ("yes", "yes", ""), o

    table = subprocess.run(
        [*VMSHIELD, "doctor", lab.name], capture_output=True, text=True, timeout=300
    )
    assert table.returncode == 0 and "security space" in table.stdout
    assert "process.exec" in table.stdout
