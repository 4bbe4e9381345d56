"""Where vmshield keeps its cache (kernels, symbol tables) and its run state (lab VMs).

Both can be moved with environment variables so tests and CI can isolate themselves.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Downloaded kernels and per-build symbol table libraries (``$VMSHIELD_CACHE``)."""
    env = os.environ.get("VMSHIELD_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "vmshield"


def run_dir() -> Path:
    """Sockets, logs and pid files of lab VMs (``$VMSHIELD_RUN``)."""
    env = os.environ.get("VMSHIELD_RUN")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_RUNTIME_DIR", "/tmp")) / "vmshield"


def project_root() -> Path:
    """The source checkout (for the built initramfs and guest programs)."""
    return Path(__file__).resolve().parents[2]


def kernels_dir() -> Path:
    return cache_dir() / "kernels"


def build_dir() -> Path:
    """Artifacts ``make setup`` builds from the project's own sources."""
    env = os.environ.get("VMSHIELD_BUILD")
    return Path(env) if env else project_root() / "build"
