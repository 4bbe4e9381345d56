"""Fixtures that boot real lab VMs (real QEMU, real Debian kernels, real guest programs).

Each VM lives in a private run folder and is stopped by a finalizer even when a test
fails. A missing prerequisite (QEMU, kernels, initramfs) fails the test loudly: run
``make setup``.
"""

from __future__ import annotations

import base64
import gzip
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmshield.lab import vm as labvm
from vmshield.lab.kernels import KNOWN_KERNELS

RUN = Path(tempfile.gettempdir()) / f"vmshield-test-{os.getpid()}"


@pytest.fixture(scope="session", autouse=True)
def _private_run_dir() -> Iterator[None]:
    """Lab VMs of this test session live in their own folder (short: socket paths)."""
    old = os.environ.get("VMSHIELD_RUN")
    os.environ["VMSHIELD_RUN"] = str(RUN)
    yield
    for info, _ in labvm.list_vms():
        labvm.stop(info.name)
    shutil.rmtree(RUN, ignore_errors=True)
    if old is None:
        os.environ.pop("VMSHIELD_RUN", None)
    else:
        os.environ["VMSHIELD_RUN"] = old


def _require_prerequisites() -> None:
    if shutil.which("qemu-system-x86_64") is None:
        pytest.fail("qemu-system-x86_64 is missing: run `make setup`")


class Lab:
    """A booted lab VM plus helpers to ask the guest for its own truth."""

    def __init__(self, name: str, kernel: str) -> None:
        self.name = name
        self.kernel = kernel
        self.vm = labvm.LabVM(name)

    def sh(self, cmd: str, timeout: float = 60, check: bool = True) -> str:
        res = self.vm.run(cmd, timeout)
        if check and res.status != 0:
            pytest.fail(f"guest command failed ({res.status}): {cmd}\n{res.output}")
        return res.output

    def fetch(self, path: str, timeout: float = 180) -> bytes:
        """A guest file's bytes, compressed over the serial line."""
        out = self.sh(f"gzip -c {path} | base64", timeout=timeout)
        return gzip.decompress(base64.b64decode(out))


def boot(kernel: str, name: str, memory: int = 512, cpus: int = 1) -> Iterator[Lab]:
    _require_prerequisites()
    labvm.start(name, kernel, memory=memory, cpus=cpus)
    try:
        yield Lab(name, kernel)
    finally:
        labvm.stop(name)


@pytest.fixture(scope="module", params=KNOWN_KERNELS)
def lab(request: pytest.FixtureRequest) -> Iterator[Lab]:
    """One lab VM per kernel family, shared by the tests of a module."""
    mod = request.module.__name__.rsplit(".", 1)[-1].replace("test_", "")[:10]
    yield from boot(request.param, f"{mod}-{request.param}")
