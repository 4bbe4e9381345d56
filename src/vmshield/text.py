"""Guest-controlled text made safe for a terminal.

Process names, paths, module and symbol names, banners and socket paths come from a
hostile guest (or a hostile local user). Written to a terminal as they are, an ESC or
CSI sequence could rewrite the screen, hide lines, retitle the window or fake a
vmshield message. Every human-readable output therefore goes through :func:`term`,
which leaves printable text alone and writes everything else as a Python-style escape
(``\\x1b``, ``\\u202e``); a backslash becomes ``\\\\`` so the result is unambiguous and
:func:`unterm` gives the original back. Machine output (``--json``) stays exact and does
not use this.
"""

from __future__ import annotations

import re

from rich.text import Text


def _escape_char(ch: str) -> str:
    if ch == "\\":
        return "\\\\"
    if ch.isprintable():
        return ch
    o = ord(ch)
    if o < 0x100:
        return f"\\x{o:02x}"
    if o < 0x10000:
        return f"\\u{o:04x}"
    return f"\\U{o:08x}"


def term(s: object) -> str:
    """``s`` (``str()`` of it) with every non-printable character and backslash escaped.

    No C0 or C1 control character, DEL, line/paragraph separator, bidi override or
    other non-printable code point survives; printable text, including non-ASCII
    letters, is unchanged.
    """
    text = s if isinstance(s, str) else str(s)
    if text.isprintable() and "\\" not in text:
        return text  # the common case, without a per-character loop
    return "".join(_escape_char(ch) for ch in text)


_ESCAPE = re.compile(r"\\(\\|x[0-9a-f]{2}|u[0-9a-f]{4}|U[0-9a-f]{8})")


def unterm(s: str) -> str:
    """The inverse of :func:`term` (for tests and for users decoding a copied line)."""

    def one(m: re.Match[str]) -> str:
        body = m[1]
        return "\\" if body == "\\" else chr(int(body[1:], 16))

    return _ESCAPE.sub(one, s)


def cell(s: object) -> Text:
    """A Rich table cell or line of guest text: escaped, and never read as Rich markup
    (a ``[/x]`` in a process name is text, not a closing tag)."""
    return Text(term(s))


__all__ = ["cell", "term", "unterm"]
