"""The guest kernels the lab boots, and their decompressed ELF for offline analysis.

``make setup`` (scripts/fetch-kernels.sh) caches four Debian cloud kernels under
:func:`vmshield.paths.kernels_dir`; the CLI and the tests name them by version family
("5.10", "6.1", "6.12", "7.3") instead of by path, and a user may pass a path to any other
bzImage. Offline analysis needs the decompressed ``vmlinux`` too, which is extracted once
and cached next to the image.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from vmshield.errors import LabError
from vmshield.guest.vmlinuz import extract_vmlinux
from vmshield.paths import kernels_dir

KNOWN_KERNELS = ("5.10", "6.1", "6.12", "7.3")
"""The kernel families ``make setup`` fetches (Debian bullseye, bookworm, trixie,
trixie-backports)."""

_ELF_MAGIC = b"\x7fELF"


def _looks_like_path(spec: str) -> bool:
    """A spec with a directory separator or a leading ``.``/``~`` means a file, not a version."""
    return (
        os.sep in spec
        or (os.altsep is not None and os.altsep in spec)
        or spec.startswith((".", "~"))
    )


def kernel_path(spec: str | os.PathLike[str]) -> Path:
    """The bzImage for ``spec``: a known version family from the cache, or a file path.

    Raises :class:`LabError` for an unknown spec or a missing file, saying that
    ``make setup`` fetches the known kernels, since that is the usual fix.
    """
    text = os.fspath(spec)
    if text in KNOWN_KERNELS:
        path = kernels_dir() / text / "vmlinuz"
        if not path.is_file():
            raise LabError(
                f"kernel {text} is not in the cache ({path} is missing); "
                "`make setup` fetches the kernels"
            )
        return path
    path = Path(text).expanduser()
    if text and path.is_file():
        return path
    if isinstance(spec, os.PathLike) or _looks_like_path(text):
        raise LabError(
            f"kernel {text!r}: {path} is not a file; give one of {', '.join(KNOWN_KERNELS)} "
            "(`make setup` fetches the kernels) or a path to a bzImage"
        )
    # A bare word that is neither a known family nor a file here: most likely a typo
    # like "6.2", so list what is known.
    raise LabError(
        f"unknown kernel {text!r}: expected one of {', '.join(KNOWN_KERNELS)} or a path "
        "to a bzImage; `make setup` fetches the known kernels"
    )


def _vmlinux_target(vmlinuz: Path) -> Path:
    """Where the decompressed ELF of ``vmlinuz`` is cached: next to it.

    ``vmlinuz`` -> ``vmlinux`` (the cache layout), ``vmlinuz-6.1.0-18-amd64`` ->
    ``vmlinux-6.1.0-18-amd64`` (the /boot convention), anything else gets ``.vmlinux``
    appended so it never overwrites the image itself.
    """
    name = vmlinuz.name
    if name.startswith("vmlinuz"):
        return vmlinuz.with_name("vmlinux" + name[len("vmlinuz") :])
    return vmlinuz.with_name(name + ".vmlinux")


def _is_current(target: Path, vmlinuz: Path) -> bool:
    """True when ``target`` is an ELF at least as new as the image it was extracted from."""
    try:
        if target.stat().st_mtime < vmlinuz.stat().st_mtime:
            return False
        with open(target, "rb") as handle:
            return handle.read(4) == _ELF_MAGIC
    except OSError:
        return False


def vmlinux_path(spec: str | os.PathLike[str]) -> Path:
    """The decompressed kernel ELF for ``spec``, extracting and caching it on first use.

    The ELF is written to a temporary file in the same directory and renamed into place,
    so concurrent callers and interrupted runs never leave a partial ``vmlinux`` that a
    later call would trust. Extraction errors are :class:`GuestFormatError`; a directory
    we cannot write to is a :class:`LabError`.
    """
    vmlinuz = kernel_path(spec)
    target = _vmlinux_target(vmlinuz)
    if _is_current(target, vmlinuz):
        return target
    elf = extract_vmlinux(vmlinuz)
    tmp_name: str | None = None
    try:
        fd, tmp_name = tempfile.mkstemp(
            dir=target.parent, prefix=f".{target.name}.", suffix=".part"
        )
        with os.fdopen(fd, "wb") as handle:
            handle.write(elf)
            os.fchmod(handle.fileno(), 0o644)  # mkstemp's 0600 would hide it from other users
        os.replace(tmp_name, target)
        tmp_name = None
    except OSError as exc:
        raise LabError(
            f"cannot write the decompressed kernel to {target}: {exc.strerror or exc}"
        ) from None
    finally:
        if tmp_name is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp_name)
    return target
