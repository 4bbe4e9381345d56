"""Bad command-line input as one line and exit status 2, before anything is touched.

Typer parses ``nan``, ``inf`` and negative numbers as valid floats, so durations are
checked here; and usage errors that click finds itself (a missing argument, ``--memory
abc``) are printed as one ``error:`` line instead of click's usage box. Kept free of
heavy imports: every command loads it.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from typing import Any

import typer
from typer.core import TyperGroup

from vmshield.errors import VmshieldError
from vmshield.text import term


def seconds(option: str, value: float | None, optional: bool = False) -> None:
    """A duration must be a finite number of seconds above zero."""
    if value is None and optional:
        return
    if value is None or not math.isfinite(value) or value <= 0:
        raise VmshieldError(f"{option} must be a number of seconds above 0, not {value}")


class OneLineErrors(TyperGroup):
    """The root command group, with usage errors (a missing argument, ``--memory abc``,
    an unknown option) as one ``error:`` line and exit status 2, like every other bad
    input, instead of click's usage box. ``--help`` and a bare command still print help."""

    def main(  # type: ignore[override]
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, False, **extra)
        except typer.TyperException as e:
            if type(e).__name__ == "NoArgsIsHelpError":  # no arguments: the help text
                sys.stderr.write(e.format_message() + "\n")
            else:
                sys.stderr.write(f"error: {term(e.format_message())}\n")
            sys.exit(e.exit_code)
        except typer.Abort:
            sys.stderr.write("error: aborted\n")
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)
