"""The error hierarchy of vmshield.

Every failure a user can meet is a :class:`VmshieldError` with a message that names the
problem (which VM, which symbol, which byte offset), so the CLI can print it as is and
exit non-zero instead of showing a traceback. Lower layers raise the narrow subclasses;
nothing in vmshield raises a bare ``Exception``.
"""

from __future__ import annotations


class VmshieldError(Exception):
    """Base class of every error vmshield reports to its user."""


class GuestFormatError(VmshieldError):
    """Bytes read from the guest (or a file about it) do not have the expected format.

    The guest is hostile: this is the normal outcome of corrupt or forged input, never a
    crash of the monitor.
    """


class TranslationError(VmshieldError):
    """A guest virtual address is not mapped (or its page tables are malformed)."""


class MemoryAccessError(VmshieldError):
    """Guest physical memory outside the guest's RAM was asked for."""


class HypervisorError(VmshieldError):
    """QEMU (QMP, gdbstub, launcher) failed or answered something unexpected."""


class LabError(VmshieldError):
    """A lab VM operation failed (unknown VM, name taken, boot timeout, ...)."""


class SymbolError(VmshieldError):
    """A symbol or type the request needs is missing from this kernel."""
