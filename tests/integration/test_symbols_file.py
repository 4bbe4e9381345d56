"""``--symbols FILE``: attach with a symbol table from outside the guest (here made from
the guest's own /proc/kallsyms, as /proc/kallsyms text and as a System.map at link-time
addresses, or copied by the guest agent), and refuse a table of another build. On 7.3
only: the path does not depend on the kernel beyond what the kallsyms tests already cover
on every kernel."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unit.test_kallsyms_synthetic import decode_all, real_rodata
from vmshield.paths import kernels_dir

from .conftest import Lab, boot

VMSHIELD = [sys.executable, "-m", "vmshield"]
LINK_TEXT = 0xFFFF_FFFF_8100_0000


@pytest.fixture(scope="module")
def lab73() -> Iterator[Lab]:
    yield from boot("7.3", "symfile-7.3")


@pytest.fixture(scope="module")
def guest_kallsyms(lab73: Lab) -> list[str]:
    return lab73.fetch("/proc/kallsyms").decode().splitlines()


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*VMSHIELD, *args], capture_output=True, text=True, timeout=300)


def kernel_json(lab: Lab, *extra: str) -> dict[str, object]:
    res = run("kernel", lab.name, "--json", *extra)
    assert res.returncode == 0, res.stderr
    info: dict[str, object] = json.loads(res.stdout)
    return info


def test_proc_kallsyms_copy(lab73: Lab, guest_kallsyms: list[str], tmp_path: Path) -> None:
    path = tmp_path / "kallsyms.txt"
    path.write_text("\n".join(guest_kallsyms) + "\n")
    own = kernel_json(lab73)
    info = kernel_json(lab73, "--symbols", str(path))
    assert info["kaslr_slide"] == own["kaslr_slide"] and info["release"] == own["release"]
    assert info["symbols"] == sum(1 for line in guest_kallsyms if "\t[" not in line)
    res = run(
        "symbols", lab73.name, "^(commit_creds|init_task|current_task)$", "--symbols", str(path)
    )
    assert res.returncode == 0, res.stderr
    wanted = {" commit_creds", " init_task", " current_task"}
    guest = sorted(line for line in guest_kallsyms if any(line.endswith(w) for w in wanted))
    assert sorted(res.stdout.splitlines()) == guest
    ps = run("ps", lab73.name, "--json", "--symbols", str(path))
    assert ps.returncode == 0, ps.stderr
    assert any(p["pid"] == 1 for p in json.loads(ps.stdout))


def test_system_map_at_link_addresses(
    lab73: Lab, guest_kallsyms: list[str], tmp_path: Path
) -> None:
    """A System.map has link-time addresses: vmshield moves them by the KASLR slide."""
    slide = int(str(kernel_json(lab73)["kaslr_slide"]), 16)
    rows = []
    for line in guest_kallsyms:
        if "\t[" in line:
            continue
        addr, typ, name = line.split()
        a = int(addr, 16)
        if 0xFFFF_FFFF_8000_0000 <= a < 0xFFFF_FFFF_C000_0000:
            a -= slide
        rows.append((a, typ, name))
    rows.sort()
    path = tmp_path / "System.map"
    path.write_text("".join(f"{a:016x} {t} {n}\n" for a, t, n in rows))
    assert f"{LINK_TEXT:016x} T _text\n" in path.read_text()
    res = run("symbols", lab73.name, "^do_exit$", "--symbols", str(path))
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == [x for x in guest_kallsyms if x.endswith(" do_exit")]
    mods = run("modules", lab73.name, "--symbols", str(path))
    assert mods.returncode == 0, mods.stderr


def test_table_of_another_build_is_refused(lab73: Lab, tmp_path: Path) -> None:
    """The 6.12 kernel's own table (decoded from its image) against the 7.3 guest: the
    slide is a 2 MiB step, so only guest memory can tell, and it does."""
    rodata, base = real_rodata("6.12")
    _, d, addrs = decode_all(rodata, base)
    path = tmp_path / "System.map-6.12"
    rows = zip(d.names, addrs, d.types, strict=True)
    path.write_text("".join(f"{a:016x} {t} {n}\n" for n, a, t in rows))
    res = run("kernel", lab73.name, "--symbols", str(path))
    assert res.returncode == 2
    assert "Traceback" not in res.stderr and res.stderr.startswith("error: --symbols")
    line = " ".join(res.stderr.split())  # rich wraps the one line at the console width
    assert "does not match this guest" in line and "System.map-6.12" in line

    junk = tmp_path / "junk.map"
    junk.write_text("not a symbol table\n")
    res = run("ps", lab73.name, "--symbols", str(junk))
    assert res.returncode == 2 and "junk.map: line 1" in " ".join(res.stderr.split())


def test_transfer_through_the_guest_agent(
    lab73: Lab, guest_kallsyms: list[str], tmp_path: Path
) -> None:
    """``--symbols guest-agent``: the guest's /proc/kallsyms copied by a script run through
    its guest agent (the lab's vmsqga on the org.qemu.guest_agent.0 port), kptr_restrict=2
    handled and put back, cached per build, checked against memory like any file."""
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "kernels").symlink_to(kernels_dir())
    env = {**os.environ, "VMSHIELD_CACHE": str(cache)}
    lab73.sh("echo 2 > /proc/sys/kernel/kptr_restrict")
    try:
        pattern = "^(commit_creds|do_exit)$"
        res = subprocess.run(
            [*VMSHIELD, "symbols", lab73.name, pattern, "--symbols", "guest-agent"],
            capture_output=True, text=True, timeout=300, env=env,
        )  # fmt: skip
        assert res.returncode == 0, res.stderr
        guest = [x for x in guest_kallsyms if x.endswith((" commit_creds", " do_exit"))]
        assert sorted(res.stdout.splitlines()) == sorted(guest)
        entries = list((cache / "transfer").iterdir())
        assert len(entries) == 1 and (entries[0] / "btf").stat().st_size > 1 << 20
        assert lab73.sh("cat /proc/sys/kernel/kptr_restrict").strip() == "2"
        doc = subprocess.run(  # the second time from the cache
            [*VMSHIELD, "doctor", lab73.name, "--json", "--symbols", "guest-agent"],
            capture_output=True, text=True, timeout=300, env=env,
        )  # fmt: skip
        assert doc.returncode == 0, doc.stderr
        source = {r["what"]: r for r in json.loads(doc.stdout)["kernel"]}["symbol source"]
        assert source["found"].startswith("guest agent") and "cached" in source["found"]
    finally:
        lab73.sh("echo 0 > /proc/sys/kernel/kptr_restrict", check=False)


def test_agent_is_the_fallback_when_kallsyms_is_not_found(
    lab73: Lab, guest_kallsyms: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kernel whose kallsyms the finder cannot read (stood in for by making the finder
    fail: the guest, QEMU and the agent are real) still attaches through its agent, and
    stderr says so."""
    from typer.testing import CliRunner

    from vmshield.cli.main import app
    from vmshield.errors import GuestFormatError
    from vmshield.guest.kernel import Kernel

    def not_found(*_args: object, **_kw: object) -> Kernel:
        raise GuestFormatError("kallsyms tables not found (a layout nobody has seen)")

    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "kernels").symlink_to(kernels_dir())
    monkeypatch.setenv("VMSHIELD_CACHE", str(cache))
    monkeypatch.setattr(Kernel, "attach", staticmethod(not_found))
    res = CliRunner().invoke(app, ["symbols", lab73.name, "^do_exit$"])
    assert res.exit_code == 0, res.output
    assert [x for x in guest_kallsyms if x.endswith(" do_exit")] == [
        line for line in res.output.splitlines() if line.endswith(" do_exit")
    ]
    assert "asking the guest agent" in res.output  # the note (CliRunner mixes stderr in)
