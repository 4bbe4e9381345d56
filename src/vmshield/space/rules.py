"""Request filters as the in-guest agent evaluates them (issue 12): every filter the
request language has, decided in the guest exactly as the exit engine decides it.

The exit engine compares text (:func:`vmshield.objects.filters.match_filter`): ``pid``
and ``uid`` as decimal text for equality, everything else with ``fnmatch.fnmatchcase``
against the field as ``str()`` prints it (a path, an address as :mod:`ipaddress`
prints it, a port in decimal, ``True``/``False``, ``None`` for a field the event lacks).
The agent builds the same texts from its captured bytes and matches them with a small
interpreter of *glob programs* compiled here. Compiling rather than shipping the
pattern keeps the C small and the semantics in one place: a ``[...]`` class becomes the
list of code-point ranges that Python's own ``fnmatch`` regex accepts (found by testing
one character per interval between the class's characters, where membership cannot
change), so ``!``, ranges, ``]`` first and the other corner cases of ``fnmatch`` need no
C of their own.

A program is a byte string: printable ASCII bytes stand for themselves; ``G_STAR``,
``G_ANY``; ``G_LIT`` + a 24-bit code point; ``G_CLASS`` + a count + that many (low,
high) 24-bit code-point pairs; ``G_END``. A path program is followed by alternatives
(``G_ALT`` + program): :func:`~vmshield.objects.filters.path_could_match` tries every
start of the pattern's *text* against a path cut to fit the record, and a start that
ends inside a class reads its ``[`` as a plain character: each class adds the program of
that reading.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import itertools
import re

from vmshield.space import layout as L

TEXT_KEYS = {"comm": L.T_COMM, "path": L.T_PATH, "address": L.T_ADDR, "port": L.T_PORT,
             "escalation": L.T_ESC, "changed": L.T_CHG}  # fmt: skip
NUMBER_KEYS = {"pid": (-(1 << 31), 1 << 31), "uid": (0, 1 << 32)}
AGENT_FILTERS = frozenset(TEXT_KEYS) | frozenset(NUMBER_KEYS)
MAX_CODE_POINT = 0x10FFFF


class TooLong(ValueError):
    """A pattern whose program does not fit the rule (the host checks it instead)."""


def _class_end(pat: str, i: int) -> int:
    """Where the class opened by ``pat[i - 1] == "["`` closes, as ``fnmatch.translate``
    scans it (``!`` first negates, ``]`` first is a member); -1: the ``[`` is literal."""
    j = i
    if j < len(pat) and pat[j] == "!":
        j += 1
    if j < len(pat) and pat[j] == "]":
        j += 1
    while j < len(pat) and pat[j] != "]":
        j += 1
    return j if j < len(pat) else -1


def class_ranges(text: str) -> list[tuple[int, int]]:
    """The code points the class ``text`` (``[...]``, as written) matches, as ranges."""
    rx = re.compile(fnmatch.translate(text))
    cuts = sorted({0, MAX_CODE_POINT + 1} | {ord(c) for c in text} | {ord(c) + 1 for c in text})
    out: list[tuple[int, int]] = []
    for lo, nxt in itertools.pairwise(cuts):
        if lo > MAX_CODE_POINT or not rx.match(chr(lo)):
            continue
        if out and out[-1][1] == lo - 1:
            out[-1] = (out[-1][0], nxt - 1)
        else:
            out.append((lo, nxt - 1))
    return out


def _cp(c: int) -> bytes:
    return c.to_bytes(3, "little")


def _literal(ch: str) -> bytes:
    return ch.encode() if 0x20 <= ord(ch) <= 0x7E else bytes([L.G_LIT]) + _cp(ord(ch))


def _tokens(pat: str, classes: bool = True) -> list[tuple[int, bytes]]:
    """The pattern as (position in the text, token bytes); ``classes=False`` reads every
    ``[`` as a plain character (the inside of a cut class)."""
    out: list[tuple[int, bytes]] = []
    i = 0
    while i < len(pat):
        c = pat[i]
        if c == "*":
            if not out or out[-1][1] != bytes([L.G_STAR]):
                out.append((i, bytes([L.G_STAR])))
        elif c == "?":
            out.append((i, bytes([L.G_ANY])))
        elif c == "[" and classes and (j := _class_end(pat, i + 1)) >= 0:
            ranges = class_ranges(pat[i : j + 1])
            if len(ranges) > 255:
                raise TooLong(f"class {pat[i : j + 1]!r} has too many ranges")
            body = b"".join(_cp(lo) + _cp(hi) for lo, hi in ranges)
            out.append((i, bytes([L.G_CLASS, len(ranges)]) + body))
            i = j
        else:
            out.append((i, _literal(c)))
        i += 1
    return out


def glob_program(pat: str, cut_alternatives: bool = False) -> bytes:
    """The program of ``pat`` (see the module docstring); with ``cut_alternatives``, the
    alternatives a cut path is also tried against."""
    toks = _tokens(pat)
    prog = b"".join(t for _, t in toks)
    if cut_alternatives:
        for at, tok in toks:
            if tok[0] != L.G_CLASS:
                continue
            j = _class_end(pat, at + 1)
            before = b"".join(t for pos, t in toks if pos < at)
            inside = b"".join(t for _, t in _tokens(pat[at + 1 : j], classes=False))
            prog += bytes([L.G_ALT]) + before + b"[" + inside
    return prog + bytes([L.G_END])


def number_filter(key: str, val: str) -> int | None:
    """The number a ``pid``/``uid`` filter equals, or None if no value can equal it (the
    exit engine compares ``str(value) == val``: only canonical decimal text matches)."""
    lo, hi = NUMBER_KEYS[key]
    try:
        v = int(val)
    except ValueError:
        return None
    return v if str(v) == val and lo <= v < hi else None


def rule_for(action: int, filters: dict[str, str]) -> L.Rule:
    """The agent's rule for one request's filters. Every filter is evaluated in the guest
    unless its program does not fit (``R_HOST``: the host checks the records the rule
    lets through) or its key is unknown here (also ``R_HOST``)."""
    r = L.Rule()
    r.action = action
    prog = b""
    for key, val in filters.items():
        if key in NUMBER_KEYS:
            v = number_filter(key, val)
            if v is None:
                r.has |= L.R_NEVER
            elif key == "pid":
                r.has |= L.R_PID
                r.pid = v
            else:
                r.has |= L.R_UID
                r.uid = v
            continue
        t = TEXT_KEYS.get(key)
        if t is None:
            r.has |= L.R_HOST
            continue
        try:
            p = glob_program(val, cut_alternatives=key == "path")
        except TooLong:
            r.has |= L.R_HOST
            continue
        if len(prog) + len(p) > L.RULE_PROG:
            r.has |= L.R_HOST
            continue
        r.at[t] = len(prog)
        r.has |= 4 << t
        prog += p
    r.prog[: len(prog)] = prog
    return r


def rule_problem(filters: dict[str, str]) -> str | None:
    """Why the agent cannot decide these filters exactly as the exit engine would (None:
    it can; then ``deny`` and ``kill`` are decided in the guest)."""
    for key in filters:
        if key not in AGENT_FILTERS:
            return f"the agent cannot evaluate filter {key!r}"
    if rule_for(L.A_LOG, filters).has & L.R_HOST:
        return (f"the filters' patterns need more than the {L.RULE_PROG} bytes a rule holds "
                "in the guest (use shorter patterns)")  # fmt: skip
    return None


def v4mapped_dotted() -> int:
    """``N_V4MAPPED_DOTTED`` when this Python prints an IPv4-mapped IPv6 address dotted
    (the agent must print addresses as the host's exit engine does)."""
    mapped = str(ipaddress.IPv6Address("::ffff:1.2.3.4")) == "::ffff:1.2.3.4"
    return L.N_V4MAPPED_DOTTED if mapped else 0
