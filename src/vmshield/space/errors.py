"""Errors of the security space, by what the caller can do about them."""

from __future__ import annotations

from vmshield.errors import VmshieldError


class SpaceError(VmshieldError):
    """The security space cannot be built, patched or removed as asked."""


class SpaceBusy(SpaceError):
    """A vCPU is executing inside the security space."""


class StaleSpace(SpaceError):
    """The state file describes a space the guest no longer holds."""
