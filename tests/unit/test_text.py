"""The terminal-escaping helper every human-readable guest string goes through."""

from __future__ import annotations

import io

from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console

from vmshield.text import cell, term, unterm


def controls(s: str) -> list[str]:
    """C0, DEL and C1 control characters in ``s``."""
    return [ch for ch in s if ord(ch) < 0x20 or 0x7F <= ord(ch) < 0xA0]


def test_examples() -> None:
    assert term("sshd") == "sshd"
    assert term("kworker/0:1-events") == "kworker/0:1-events"
    assert term("über ✓") == "über ✓"
    assert term("\x1b[2Jevil") == "\\x1b[2Jevil"
    assert term("a\nb\tc\r") == "a\\x0ab\\x09c\\x0d"
    assert term("\x9b31m") == "\\x9b31m"  # C1 CSI
    assert term("x\u202eexe.txt") == "x\\u202eexe.txt"  # bidi override
    assert term("a\\x1b") == "a\\\\x1b"  # a literal backslash stays distinguishable
    assert term(42) == "42"


@settings(max_examples=500)
@given(st.text())
def test_no_control_characters_and_reversible(s: str) -> None:
    out = term(s)
    assert controls(out) == []
    assert out.isprintable()
    assert unterm(out) == s


@settings(max_examples=200)
@given(st.text(), st.text())
def test_unambiguous(a: str, b: str) -> None:
    if a != b:
        assert term(a) != term(b)


@settings(max_examples=200)
@given(st.text())
def test_rich_cell_prints_exactly_the_escaped_text(s: str) -> None:
    """A cell is never read as markup: '[/x]' and '[red]' are printed as they are."""
    buf = io.StringIO()
    Console(file=buf, width=10_000, force_terminal=False, highlight=False).print(
        cell(s), soft_wrap=True
    )
    assert buf.getvalue() == term(s) + "\n"
    assert controls(buf.getvalue()[:-1]) == []


def test_event_lines_escape_guest_strings() -> None:
    from vmshield.cli.render import event_line
    from vmshield.monitor.events import Event, PointInfo, ProcessContext

    proc = ProcessContext(pid=7, tgid=7, ppid=1, uid=0, euid=0, gid=0,
                          comm="\x1b[1Aroot", task="0x1")  # fmt: skip
    ev = Event(
        time=0.0, vm="vm1", request="req-1", object="file.open", action="log", process=proc,
        fields={"path": "/tmp/\x1b]0;pwned\x07\nfake line", "argv": ["a\x9bb"]},
        point=PointInfo(symbol="security_file_open", address="0x1", kind="kernel-function",
                        engine="exit", cpu=0),
    )  # fmt: skip
    line = event_line(ev)
    assert controls(line) == [] and "\n" not in line
    assert "\\x1b[1Aroot[7]" in line
    assert "path=/tmp/\\x1b]0;pwned\\x07\\x0afake line" in line
    assert '"\\x1b[1Aroot"' not in ev.to_json()  # JSON keeps the exact string
    assert '"comm":"\\u001b[1Aroot"' in ev.to_json()
