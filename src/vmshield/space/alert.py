"""What an integrity check found: the finding, and how to undo it if it can be undone."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Alert:
    """One integrity finding.

    ``fix`` holds guest-physical writes that put back what the guest changed (page-table
    entries, ring counters): only a finding that has one, or that :meth:`repair` knows how
    to undo by other means, is ever reported as re-armed.
    """

    what: str  # agent-code, config, site, ftrace-flags, pte, kernel-table, cpu-state, ring-state
    where: str
    address: int
    expected: str
    found: str
    fix: tuple[tuple[int, bytes], ...] = ()
