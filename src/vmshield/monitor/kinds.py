"""The choices of a monitor run as types: actions, engine kinds, tamper policies, and
the protocol both engines implement.

Why enums: these words travel from the CLI, the REST API and users' scripts down to
the engines; one definition checks them everywhere (a typo is a ``ValueError`` at the
edge, not a string compared in five places). They are ``StrEnum`` so that they compare
equal to, and serialise as, the words users type.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum
from typing import Protocol, TypeVar

from vmshield.errors import VmshieldError

E = TypeVar("E", bound=StrEnum)


class Action(StrEnum):
    """What happens when a request matches (strongest wins when several do)."""

    LOG = "log"
    DUMP = "dump"
    PAUSE = "pause"
    KILL = "kill"
    DENY = "deny"


class EngineKind(StrEnum):
    """How monitoring points are intercepted."""

    AUTO = "auto"  # the space when it can serve every request, else exits
    SPACE = "space"  # the in-guest security space: no VM exit per event
    EXIT = "exit"  # a gdbstub breakpoint stop per event


class TamperPolicy(StrEnum):
    """What the security space does when the guest changes it."""

    REARM = "rearm"  # write our bytes back
    ALERT = "alert"  # report only
    EXIT = "exit"  # remove the space and go on with breakpoint exits


class EngineStats(Protocol):
    """Counters every engine keeps (the space adds drops and alerts)."""

    hits: int
    events: int
    filtered: int
    decode_errors: int
    by_object: dict[str, int]


class Engine(Protocol):
    """An interception engine: arm the points, run until told to stop, detach."""

    kind: EngineKind
    stats: EngineStats

    def arm(self) -> None:
        """Place every point; the VM runs on. Nothing stays armed if this raises."""

    def run(self, duration: float | None, should_stop: Callable[[], bool]) -> None:
        """Handle hits until ``duration`` seconds passed or ``should_stop()`` is true."""

    def detach(self) -> None:
        """Remove every point and restore every byte changed (idempotent)."""


class ChoiceError(VmshieldError, ValueError):
    """A word that is not one of the choices (``what``: action, engine, tamper policy)."""

    def __init__(self, what: str, value: str, choices: list[str]) -> None:
        super().__init__(f"unknown {what} {value!r} (use {', '.join(choices)})")
        self.what, self.value, self.choices = what, value, choices


def parse_choice(kind: type[E], value: str | E, what: str) -> E:
    """``value`` as a member of ``kind``, or a :class:`ChoiceError` naming the choices."""
    try:
        return kind(value)
    except ValueError:
        raise ChoiceError(what, str(value), [m.value for m in kind]) from None
