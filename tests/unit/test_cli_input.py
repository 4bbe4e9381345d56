"""Bad command-line input: one line, exit status 2, no traceback, nothing armed.

A CLI unit test, not an integration test: the attach is replaced (monkeypatched) by a
fake that fails the way the real one does for a target that does not exist, naming the
target, and counts how often it was entered. Input that can be judged without a VM
(filter types, durations, usage errors) must be refused before any attach.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from tests.unit.synth_kernel import DATA_VA, TASK, SynthGuest, add_module, add_task, link
from tests.unit.synth_kernel import make_guest as synth_guest
from vmshield.cli import main
from vmshield.errors import HypervisorError
from vmshield.guest.vm import VM

runner = CliRunner()


class FakeAttach:
    """Stands for ``main.open_vm``: fails like an unknown VM, or gives a dump-like VM
    (no QEMU) on a synthetic kernel."""

    def __init__(self, kernel: Any = None) -> None:
        self.entered: list[str] = []
        self.kernel = kernel

    def __call__(self, target: str, *, symbols: Any = None, notes: Any = None) -> VM:
        self.entered.append(target)
        if self.kernel is None:
            raise HypervisorError(f"no QMP socket at {target}")
        return VM(target, None, self.kernel, lambda: None)


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> FakeAttach:
    f = FakeAttach()
    monkeypatch.setattr(main, "open_vm", f)
    monkeypatch.setenv("VMSHIELD_RUN", str(tmp_path / "run"))
    return f


def run(args: list[str], env: dict[str, str] | None = None) -> tuple[int, str]:
    res = runner.invoke(main.app, args, env=env)
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise AssertionError(f"{args!r} raised {res.exception!r}") from res.exception
    return res.exit_code, res.output


def assert_one_line_error(args: list[str], code: int, output: str) -> None:
    lines = output.strip("\n").split("\n")
    assert code == 2, (args, code, output)
    assert len(lines) == 1, (args, output)
    assert lines[0].startswith("error: "), (args, output)
    assert "Traceback" not in output
    assert "\x1b" not in output and "\r" not in output


# ----------------------------------------------------------------- hand-picked cases


@pytest.mark.parametrize(
    "args",
    [
        ["kernel", "[/x]"],
        ["kernel", "[red]vm[/red]"],
        ["ps", "\x1b]0;owned\x07[/]"],
        ["modules", "a\nb"],
        ["symbols", "vm", "[/x]"],
        ["monitor", "[/x]", "-o", "file.open"],
    ],
)
def test_markup_and_control_characters_in_targets(fake: FakeAttach, args: list[str]) -> None:
    code, out = run(args)
    assert_one_line_error(args, code, out)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["-f", "uid=root"], "uid takes a decimal number"),
        (["-f", "pid=abc"], "pid takes a decimal number"),
        (["-f", "pid=99999999999"], "pid takes a decimal number"),
        (["-f", "port=http"], "port takes a decimal number"),
        (["-f", "port=8*x"], "a port is a number"),
        (["-f", "port=70000"], "port takes a decimal number"),
        (["-f", "comm=a-name-longer-than-15"], "at most 15 bytes"),
        (["-f", "changed=maybe"], "takes true, false or *"),
        (["--check-interval", "nan"], "--check-interval must be"),
        (["--check-interval", "0"], "--check-interval must be"),
        (["--duration", "-1"], "--duration must be"),
        (["--duration", "0"], "--duration must be"),
        (["--duration", "inf"], "--duration must be"),
        (["--duration", "soon"], "Invalid value for '--duration'"),
        (["-f", "nokey"], "bad filter"),
        (["-f", "path=/x", "--action", "explode"], "cannot take action"),
    ],
)
def test_bad_monitor_options_are_refused_before_attach(
    fake: FakeAttach, flags: list[str], message: str
) -> None:
    obj = "cred.change" if "changed" in flags[-1] else "net.connect"
    obj = "file.open" if "path" in " ".join(flags) else obj
    args = ["monitor", "vm1", "-o", obj, *flags]
    code, out = run(args)
    assert_one_line_error(args, code, out)
    assert message in out
    assert fake.entered == []  # nothing attached, so nothing armed


def test_uncreatable_run_directory(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    env = {"VMSHIELD_RUN": str(blocker / "run")}
    for args in (["kernel", "somevm"], ["vm", "start", "h-x"], ["resume", "somevm"]):
        code, out = run(args, env)
        assert_one_line_error(args, code, out)
        assert "cannot create the run directory" in out


def test_usage_errors_are_one_line(fake: FakeAttach) -> None:
    for args in (["ps"], ["vm", "start", "x", "--memory", "lots"], ["nonsense"], ["kernel", "--x"]):
        code, out = run(args)
        assert_one_line_error(args, code, out)


# ----------------------------------------------------------------- generated input

text = st.text(
    st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=40
)
bad_numbers = st.one_of(
    text.filter(lambda s: not (s.isascii() and s.isdigit())),
    st.integers(2**32, 2**70).map(str),
)
bad_seconds = st.one_of(
    st.sampled_from(["nan", "-nan", "inf", "-inf", "0", "-0", "0.0", "-1e-9", "-5"]),
    st.floats(max_value=0).map(repr),
    text.filter(lambda s: _not_a_float(s)),
)


def _not_a_float(s: str) -> bool:
    try:
        return not (math.isfinite(float(s)) and float(s) > 0)
    except ValueError:
        return True


@st.composite
def bad_invocations(draw: st.DrawFn) -> tuple[list[str], bool]:
    """(arguments, whether the input can be judged before any attach)."""
    kind = draw(st.sampled_from(["target", "filter", "seconds", "boolfilter"]))
    if kind == "target":
        cmd = draw(st.sampled_from([["kernel"], ["ps"], ["modules"], ["symbols"],
                                    ["space", "status"]]))  # fmt: skip
        target = draw(text.filter(lambda s: not s.startswith("-")))
        return [*cmd, target], False
    if kind == "filter":
        key = draw(st.sampled_from(["pid", "uid", "port"]))
        val = draw(bad_numbers.filter(lambda s: "," not in s and s != ""))
        if key == "port" and set(val) <= set("0123456789*?[]!-") and set(val) & set("*?["):
            val += "x"  # a digit glob is a valid port filter
        return ["monitor", "vm1", "-o", "net.connect", "-f", f"{key}={val}"], True
    if kind == "boolfilter":
        val = draw(
            text.filter(lambda s: s and "," not in s and s.lower() not in ("true", "false", "*"))
        )
        return ["monitor", "vm1", "-o", f"cred.change,escalation={val}"], True
    opt = draw(st.sampled_from(["--duration", "--check-interval"]))
    val = draw(bad_seconds)
    return ["monitor", "vm1", "-o", "file.open", f"{opt}={val}"], True


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(bad_invocations())
def test_generated_bad_input(fake: FakeAttach, case: tuple[list[str], bool]) -> None:
    args, before_attach = case
    fake.entered.clear()
    code, out = run(args)
    assert_one_line_error(args, code, out)
    if before_attach:
        assert fake.entered == []


# --------------------------------------------------- guest strings on the terminal

EVIL = b"\x1b[2J\x1b]0;x\x07"  # clear screen, set title: 11 bytes, fits a comm


def evil_guest(g: SynthGuest) -> None:
    t1 = add_task(g, 0x2100, 1, b"init", DATA_VA + 0x3000)
    t2 = add_task(g, 0x2200, 66, EVIL, DATA_VA + 0x3040, uid=1000)
    link(g, g.symbols["init_task"] + TASK["tasks"], [t + TASK["tasks"] for t in (t1, t2)])
    m = add_module(g, 0x4100, b"[/x]\x1b[8m" + b"hidden")
    link(g, g.symbols["modules"], [m])


@pytest.fixture
def evil(monkeypatch: pytest.MonkeyPatch) -> FakeAttach:
    f = FakeAttach(kernel=synth_guest(fill=evil_guest).attach())
    monkeypatch.setattr(main, "open_vm", f)
    return f


def test_ps_escapes_guest_control_characters(evil: FakeAttach) -> None:
    code, out = run(["ps", "vm1"])
    assert code == 0, out
    assert "\x1b" not in out and "\x07" not in out
    assert "\\x1b[2J\\x1b]0;x\\x07" in out
    code, out = run(["ps", "vm1", "--json"])
    assert code == 0
    assert '"comm": "\\u001b[2J\\u001b]0;x\\u0007"' in out  # exact, JSON-escaped


def test_modules_escape_guest_control_characters(evil: FakeAttach) -> None:
    code, out = run(["modules", "vm1"])
    assert code == 0, out
    assert "[/x]\\x1b[8mhidden" in out and "\x1b" not in out
    code, out = run(["modules", "vm1", "--json"])
    assert code == 0 and '"name": "[/x]\\u001b[8mhidden"' in out


def test_kernel_escapes_a_forged_banner(evil: FakeAttach, monkeypatch: pytest.MonkeyPatch) -> None:
    k = evil.kernel
    monkeypatch.setitem(vars(k), "banner", "Linux version 6.1 \x1b[31m[/red]")
    code, out = run(["kernel", "vm1"])
    assert code == 0, out
    assert "\\x1b[31m[/red]" in out and "\x1b" not in out
