"""How a request's filters match an event, the same for both engines (the security
space's agent decides the filters it can exactly in the guest; the host decides the
rest with these)."""

from __future__ import annotations

import fnmatch
from typing import Any


def path_could_match(cut: str, pattern: str) -> bool:
    """Whether a path known only in part could match ``pattern``, for both engines.

    ``cut`` is either the root-most part of the path (the security space keeps that much
    of a path too long for its record) or ``.../NAME`` (a path deeper than any bound,
    whose root-most part is unknown). A filter must not be walked around with a long or
    deep path, so the answer errs towards a match: a prefix matches if some start of the
    pattern matches it whole (whatever remains of a glob can match some continuation);
    an unknown root-most part always may match.
    """
    if not cut.startswith("/"):
        return True
    return any(fnmatch.fnmatchcase(cut, pattern[:i]) for i in range(len(pattern) + 1))


def match_filter(key: str, want: str, ev_fields: dict[str, Any], proc: dict[str, Any]) -> bool:
    """One filter against an event (pid/comm/uid on the process, the rest on fields)."""
    if key in ("pid", "uid"):
        return str(proc.get(key)) == want
    if key == "comm":
        return fnmatch.fnmatchcase(str(proc.get("comm", "")), want)
    if key == "path":
        path = str(ev_fields.get("path", ev_fields.get("filename", "")))
        if ev_fields.get("path_truncated"):
            return path_could_match(path, want)
        return fnmatch.fnmatchcase(path, want)
    return fnmatch.fnmatchcase(str(ev_fields.get(key)), want)
