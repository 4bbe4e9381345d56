"""The generated tamper module really writes read-only guest kernel code, on every lab
kernel (5.10, 6.1, 6.12, 7.3).

This is the in-guest attacker of the tamper test (docs/security-space-plan.md, section 7):
a module built on the host, pushed over the serial console and loaded with busybox
``insmod``. Its init writes the given bytes with ``CR0.WP`` cleared and fails with
``-ENODEV``. Each test writes bytes that are never executed, checks them from the host
through guest memory, writes the original bytes back with a second module and checks that
the guest is still healthy (the lab boots with ``oops=panic``, so a bad write kills it).
"""

from __future__ import annotations

import base64
from collections.abc import Iterator

import pytest

from vmshield.guest.kernel import Kernel
from vmshield.guest.modules import modules
from vmshield.guest.symcache import SymbolCache
from vmshield.hv.target import Target
from vmshield.lab.tampermod import build_tamper_module
from vmshield.paths import cache_dir

from .conftest import Lab

PADDING = frozenset({0x90, 0xCC})  # nop / int3 fill between functions
# Functions a healthy lab guest never runs; the padding just before each is never run either
# (it follows the previous function's last ret/jmp, or is 6.12's __pfx_ nop area).
NEVER_RUN = (
    "panic",
    "sysrq_handle_crash",
    "emergency_restart",
    "kernel_halt",
    "machine_halt",
    "sysrq_handle_reboot",
)
CHUNK = 2000  # base64 characters per serial command line


@pytest.fixture
def kernel(lab: Lab) -> Iterator[Kernel]:
    """The guest kernel, attached through QMP and shared RAM (reads are live).

    With the user's symbol cache, as test_space does: an uncached 6.1 attach takes minutes.
    """
    t = Target(lab.name).open()
    try:
        cpu = t.cpus()[0]
        yield Kernel.attach(t.mem.read, cpu.cr3, cpu.cr4, SymbolCache(cache_dir() / "symtab"))
    finally:
        t.close()


def push(lab: Lab, data: bytes, path: str) -> None:
    """Copy a file into the guest: base64 over the serial console, in short lines."""
    b64 = base64.b64encode(data).decode()
    lab.sh(f"rm -f {path}.b64")
    for i in range(0, len(b64), CHUNK):
        lab.sh(f"printf '%s' {b64[i : i + CHUNK]} >> {path}.b64")
    lab.sh(f"base64 -d {path}.b64 > {path} && rm {path}.b64")
    assert int(lab.sh(f"wc -c < {path}").strip()) == len(data)


def tamper(lab: Lab, address: int, data: bytes, name: str) -> None:
    """Build, push and load a tamper module; its init must run and refuse to stay."""
    push(lab, build_tamper_module(lab.kernel, address, data, name=name), f"/tmp/{name}.ko")
    res = lab.vm.run(f"insmod /tmp/{name}.ko", 60)
    assert res.status != 0 and "No such device" in res.output, res.output
    assert name not in lab.sh("cat /proc/modules")


def assert_healthy(lab: Lab) -> None:
    assert lab.sh("echo ok").strip() == "ok"
    dmesg = lab.sh("dmesg")
    assert "Oops" not in dmesg and "BUG:" not in dmesg, dmesg[-3000:]


def padding_site(k: Kernel) -> tuple[int, bytes]:
    """Up to 4 padding bytes ending just before a never-run function, and their value."""
    for fn in NEVER_RUN:
        if fn not in k.symbols:
            continue
        end = k.symbols.address(fn)
        before = k.read(end - 4, 4)
        n = 0
        while n < 4 and before[3 - n] in PADDING:
            n += 1
        if n:
            return end - n, before[4 - n :]
    pytest.fail(f"no padding byte before any of {', '.join(NEVER_RUN)}")


def test_overwrites_and_restores_kernel_text(lab: Lab, kernel: Kernel) -> None:
    site, original = padding_site(kernel)
    page = kernel.walker.lookup(site)
    assert not page.writable and not page.nx, "the site must be read-only kernel code"
    forged = bytes(b ^ 0x5A for b in original)

    tamper(lab, site, forged, "vms_tamper")
    assert kernel.read(site, len(forged)) == forged
    assert "module verification failed" in lab.sh("dmesg")  # unsigned: loaded, tainted

    tamper(lab, site, original, "vms_restore")
    assert kernel.read(site, len(original)) == original
    assert_healthy(lab)


def test_overwrites_and_restores_module_text(lab: Lab, kernel: Kernel) -> None:
    # A real module's code lives in vmalloc'd module space, mapped read-only + executable.
    lab.sh("grep -q '^crc_itu_t ' /proc/modules || insmod /lib/modules/$(uname -r)/crc-itu-t.ko")
    (mod,) = [m for m in modules(kernel) if m.name == "crc_itu_t"]
    # The end of the first text page: past crc_itu_t's few dozen bytes of code, zero fill.
    site = mod.base + 0xFF0
    page = kernel.walker.lookup(site)
    assert page.va == mod.base and not page.writable and not page.nx
    original = kernel.read(site, 16)
    assert original == bytes(16), original.hex()
    forged = bytes(range(0xF0, 0x100))

    tamper(lab, site, forged, "vms_tamper")
    assert kernel.read(site, 16) == forged

    tamper(lab, site, original, "vms_restore")
    assert kernel.read(site, 16) == original
    assert_healthy(lab)
    lab.sh("rmmod crc_itu_t")
