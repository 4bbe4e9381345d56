"""The symbol transfer script: the guest's own ``/proc/kallsyms`` and BTF, copied to the
host through the guest agent (``guest-exec``), cached per build.

Why: when kallsyms cannot be found by structure in guest memory, a guest that runs a
guest agent can still tell its symbols. The script raises ``kptr_restrict`` from 2 to 1
for the copy (the agent runs as root, which 1 lets see addresses) and puts it back. What
comes back is used like any ``--symbols`` file: rebased and checked against guest memory
(:mod:`vmshield.guest.extsyms`), since the guest may lie.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import zlib
from pathlib import Path

from vmshield.errors import GuestFormatError
from vmshield.guest.kernel import Kernel
from vmshield.guest.paging import ReadPhys
from vmshield.hv.qga import GuestAgent
from vmshield.paths import cache_dir

KALLSYMS_SCRIPT = """
k=/proc/sys/kernel/kptr_restrict
old=$(cat $k 2>/dev/null || echo 0)
[ "$old" -gt 1 ] 2>/dev/null && echo 1 > $k
gzip -c /proc/kallsyms
rc=$?
[ "$old" -gt 1 ] 2>/dev/null && echo "$old" > $k
exit $rc
"""
BTF_SCRIPT = "gzip -c /sys/kernel/btf/vmlinux"
MAX_TEXT = 64 << 20


def _gunzip(data: bytes, what: str) -> bytes:
    d = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    try:
        out = d.decompress(data, MAX_TEXT + 1)
    except zlib.error as e:
        raise GuestFormatError(f"guest agent: {what} is not gzip data ({e})") from None
    if len(out) > MAX_TEXT or not d.eof:
        raise GuestFormatError(f"guest agent: {what} is truncated or larger than 64 MiB")
    return out


def _write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def transfer(agent: GuestAgent, folder: Path) -> tuple[Path, bool]:
    """(path of the guest's /proc/kallsyms text on the host, whether it was cached).

    Entries are keyed by the SHA-256 of the guest's /proc/version (build, compiler,
    date); the BTF goes next to it as ``btf``."""
    agent.sync()
    status, version = agent.run(["/bin/sh", "-c", "cat /proc/version"], timeout=30)
    if status != 0 or not version.startswith(b"Linux version "):
        raise GuestFormatError("guest agent: /proc/version does not read 'Linux version'")
    entry = folder / hashlib.sha256(version.strip()).hexdigest()
    kallsyms = entry / "kallsyms"
    if kallsyms.is_file():
        return kallsyms, True
    status, packed = agent.run(["/bin/sh", "-c", KALLSYMS_SCRIPT], timeout=300)
    if status != 0:
        raise GuestFormatError(f"guest agent: the kallsyms copy failed (status {status})")
    text = _gunzip(packed, "/proc/kallsyms")
    entry.mkdir(parents=True, exist_ok=True)
    status, btf = agent.run(["/bin/sh", "-c", BTF_SCRIPT], timeout=300)
    if status == 0:
        _write(entry / "btf", _gunzip(btf, "/sys/kernel/btf/vmlinux"))
    _write(kallsyms, text)
    return kallsyms, False


def agent_socket(target: str, run_dir: Path, spec: str) -> Path:
    """The guest agent socket for ``--symbols guest-agent[:SOCKET]``: the one given, else
    the lab VM's ``qga.sock``, else ``qga.sock`` next to a QMP socket path."""
    _, sep, path = spec.partition(":")
    if sep and path:
        return Path(path)
    lab = run_dir / target / "qga.sock"
    if lab.exists() or "/" not in target:
        return lab
    return Path(target).parent / "qga.sock"


def attach_via_agent(read_phys: ReadPhys, cr3: int, cr4: int, sock: Path) -> Kernel:
    """A kernel model from the guest's own /proc/kallsyms, copied through the agent at
    ``sock`` (cached per build), rebased and checked like any ``--symbols`` file."""
    with GuestAgent(sock) as agent:
        path, cached = transfer(agent, cache_dir() / "transfer")
    k = Kernel.attach_external(read_phys, cr3, cr4, path)
    k.symbol_source = f"guest agent {sock} ({'cached ' if cached else ''}/proc/kallsyms copy)"
    return k
