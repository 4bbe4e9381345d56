"""Setup from an empty cache: what a fresh machine runs, proven on every CI run.

CI runs on a machine whose kernel cache is warm, so a setup step that only works when its
output already exists passes unseen (it did once: the 6.12 reference ``vmlinux``
extraction died of SIGPIPE under ``pipefail`` on a fresh machine). This test runs the
whole kernel fetch and the initramfs build into empty directories. Only the downloaded
``.deb`` files and apt lists are reused (``VMSHIELD_APT_ROOT``); every extraction runs.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vmshield.guest.vmlinuz import elf_sections, extract_vmlinux, parse_bzimage_header
from vmshield.lab.kernels import KNOWN_KERNELS
from vmshield.paths import cache_dir, project_root

ROOT = project_root()


def _run(cmd: list[str], env: dict[str, str], timeout: float) -> str:
    res = subprocess.run(
        cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    if res.returncode != 0:
        pytest.fail(
            f"{' '.join(cmd)} exited {res.returncode} from an empty cache\n"
            f"stdout:\n{res.stdout[-4000:]}\nstderr:\n{res.stderr[-4000:]}",
            pytrace=False,
        )
    return res.stdout


@pytest.fixture(scope="module")
def fresh_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache filled by scripts/fetch-kernels.sh from nothing (downloads reused)."""
    cache = tmp_path_factory.mktemp("fresh-cache")
    assert not any(cache.iterdir())
    env = dict(os.environ, VMSHIELD_CACHE=str(cache), VMSHIELD_APT_ROOT=str(cache_dir() / "apt"))
    out = _run(["bash", "scripts/fetch-kernels.sh"], env, timeout=1200)
    for family in KNOWN_KERNELS:
        assert f"kernels: {family} <- " in out, out
    # Run again: idempotent, fetches and extracts nothing.
    again = _run(["bash", "scripts/fetch-kernels.sh"], env, timeout=120)
    assert "all cached" in again, again
    return cache


@pytest.mark.parametrize("family", KNOWN_KERNELS)
def test_fresh_cache_holds_a_valid_kernel(fresh_cache: Path, family: str) -> None:
    d = fresh_cache / "kernels" / family
    vmlinuz = (d / "vmlinuz").read_bytes()
    header = parse_bzimage_header(vmlinuz, source=str(d / "vmlinuz"))
    assert header.payload_length > 0
    vmlinux = d / "vmlinux"
    # The shell-made reference ELF is whole: vmshield's own extractor gives the same bytes.
    assert (
        hashlib.sha256(vmlinux.read_bytes()).digest()
        == hashlib.sha256(extract_vmlinux(d / "vmlinuz")).digest()
    )
    sections = elf_sections(vmlinux.read_bytes())
    assert ".text" in sections and ".BTF" in sections
    release = (d / "release").read_text().strip()
    assert release.startswith(family + ".") or release.startswith(family + "-"), release
    module = (d / "modules" / "crc-itu-t.ko").read_bytes()
    assert module[:4] == b"\x7fELF"
    assert f"vermagic={release} ".encode() in module
    assert (d / "config").read_text().count("CONFIG_") > 1000


def test_fresh_initramfs_from_fresh_cache(fresh_cache: Path, tmp_path: Path) -> None:
    """The guest initramfs builds from the fresh cache and carries each kernel's module."""
    out = tmp_path / "initramfs.cpio.gz"
    env = dict(os.environ, VMSHIELD_CACHE=str(fresh_cache))
    _run(["bash", "scripts/build-initramfs.sh", str(out)], env, timeout=600)
    listing = subprocess.run(
        ["cpio", "-t", "--quiet"],
        input=gzip.decompress(out.read_bytes()),
        capture_output=True,
        check=True,
    ).stdout.decode()
    for family in KNOWN_KERNELS:
        release = (fresh_cache / "kernels" / family / "release").read_text().strip()
        assert f"lib/modules/{release}/crc-itu-t.ko" in listing
    for prog in ("bin/vmstest", "bin/vmstest-pie", "bin/vmstest-suid", "bin/busybox", "init"):
        assert prog in listing.splitlines()


def test_non_editable_install_outside_the_checkout_builds_its_agent(tmp_path: Path) -> None:
    """``pip install .`` into a fresh venv: the installed vmshield (not the checkout's
    source) runs, and builds the agent from the source it ships as package data."""
    src = tmp_path / "src"
    shutil.copytree(
        ROOT, src,
        ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__",
                                      ".mypy_cache", ".ruff_cache", ".pytest_cache",
                                      ".hypothesis", ".schemathesis"),
    )  # fmt: skip
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    env = dict(
        os.environ, VMSHIELD_CACHE=str(tmp_path / "cache"), PIP_DISABLE_PIP_VERSION_CHECK="1"
    )
    env.pop("PYTHONPATH", None)
    _run([str(venv / "bin" / "pip"), "install", "-q", str(src)], env, timeout=900)
    shutil.rmtree(src)  # nothing may come from the source tree any more
    probe = "import vmshield, vmshield.space.agent as a; print(vmshield.__file__); print(a.build())"
    res = subprocess.run(
        [str(venv / "bin" / "python"), "-c", probe],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    where, obj = res.stdout.split()
    assert Path(where).is_relative_to(venv), where
    assert Path(obj).read_bytes()[:4] == b"\x7fELF"
    cat = subprocess.run(
        [str(venv / "bin" / "vmshield"), "catalog", "--json"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    assert '"file.open"' in cat.stdout
