"""Where vmshield keeps its cache (kernels, symbol tables) and its run state (lab VMs).

Both can be moved with environment variables so tests and CI can isolate themselves.

The run directory holds QMP and gdbstub sockets, pid files and state files: whoever can
write into it can make vmshield talk to their socket or signal their pid. So it is
private: a directory (not a symlink) owned by the user, mode 0700, under
``$XDG_RUNTIME_DIR`` (or ``/run/vmshield`` for root, else ``/tmp/vmshield-UID``, which
another user may create first: then vmshield refuses it instead of using it). Its state
files are opened with ``O_NOFOLLOW``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from pathlib import Path

from vmshield.errors import GuestFormatError, VmshieldError


class RunDirError(VmshieldError):
    """The run directory (or a file in it) cannot be made or is not private."""


def cache_dir() -> Path:
    """Downloaded kernels and per-build symbol table libraries (``$VMSHIELD_CACHE``)."""
    env = os.environ.get("VMSHIELD_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "vmshield"


def run_dir() -> Path:
    """Sockets, logs and pid files of lab VMs (``$VMSHIELD_RUN``); see the module doc.

    Only computes the path; :func:`private_dir` makes and checks it before use."""
    env = os.environ.get("VMSHIELD_RUN")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg) / "vmshield"
    if os.geteuid() == 0:
        return Path("/run/vmshield")
    return Path(f"/tmp/vmshield-{os.geteuid()}")


def private_dir(path: Path | None = None) -> Path:
    """Make ``path`` (default: the run directory) private and return it.

    Created 0700 when missing (parents too, as the user's own); an existing one must be
    a real directory owned by the user that no one else can write (a looser read mode
    is tightened to 0700). Anything else is refused with one line naming it.
    """
    path = run_dir() if path is None else path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, 0o700)
        st = os.lstat(path)
    except OSError as e:
        raise RunDirError(f"cannot create the run directory {path}: {e.strerror or e}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise RunDirError(f"run directory {path} is not a directory (a symlink?): refused")
    if st.st_uid != os.geteuid():
        raise RunDirError(
            f"run directory {path} belongs to uid {st.st_uid}, not to you: refused "
            "(set VMSHIELD_RUN or XDG_RUNTIME_DIR to a private directory)"
        )
    if st.st_mode & 0o022:
        raise RunDirError(
            f"run directory {path} is writable by others (mode {stat.S_IMODE(st.st_mode):o}): "
            "refused (remove it or set VMSHIELD_RUN)"
        )
    if stat.S_IMODE(st.st_mode) != 0o700:
        try:
            os.chmod(path, 0o700, follow_symlinks=False)
        except OSError as e:
            raise RunDirError(f"cannot make {path} private: {e.strerror or e}") from None
    return path


def read_private(path: Path, limit: int = 1 << 20) -> bytes:
    """A state or pid file of the run directory, never through a symlink, and only a
    regular file of the user's own (a FIFO or device would block or lie)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.ELOOP:  # the last component is a symlink
            raise RunDirError(f"{path} is a symlink: refused") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            raise RunDirError(f"{path} is not a regular file of yours: refused")
        return os.read(fd, limit)
    finally:
        os.close(fd)


def read_input(path: Path, limit: int, label: str, too_large: str, unreadable: str = "") -> bytes:
    """A file the user handed in (a symbol file, a bzImage), read whole but at most
    ``limit`` bytes: a file that cannot be read, or is larger, is a
    :class:`GuestFormatError` saying ``label: [unreadable]reason`` or ``label: too_large``."""
    try:
        with open(path, "rb") as f:
            raw = f.read(limit + 1)
    except OSError as e:
        raise GuestFormatError(f"{label}: {unreadable}{e.strerror or e}") from None
    if len(raw) > limit:
        raise GuestFormatError(f"{label}: {too_large}")
    return raw


def write_private(path: Path, data: bytes) -> None:
    """Write a state file 0600, replacing a regular file of ours; a symlink (or anything
    else) at that name is refused rather than followed."""
    try:
        fd = os.open(
            path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o600
        )
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise RunDirError(f"{path} is a symlink: refused") from None
        raise RunDirError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            raise RunDirError(f"{path} is not a regular file of yours: refused")
        os.ftruncate(fd, 0)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def project_root() -> Path:
    """The source checkout (for the built initramfs and guest programs)."""
    return Path(__file__).resolve().parents[2]


def kernels_dir() -> Path:
    return cache_dir() / "kernels"


def build_dir() -> Path:
    """Artifacts ``make setup`` builds from the project's own sources."""
    env = os.environ.get("VMSHIELD_BUILD")
    return Path(env) if env else project_root() / "build"
