"""Symbol files from outside (``--symbols``): parsing, rebasing, the prologue check."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vmshield.errors import GuestFormatError
from vmshield.guest import extsyms

TEXT = 0xFFFF_FFFF_8100_0000
MAP = f"""{0:016x} A __per_cpu_start
{TEXT:016x} T _text
{TEXT + 0x1000:016x} T commit_creds
{TEXT + 0x2000:016x} t do_exit
{0xFFFF_FFFF_C000_1000:016x} t mod_fn\t[crc_itu_t]
"""


def test_kallsyms_text_and_rebase(tmp_path: Path) -> None:
    path = tmp_path / "System.map"
    path.write_text(MAP)
    f = extsyms.load_symbol_file(path)
    assert [s.name for s in f.symbols] == ["__per_cpu_start", "_text", "commit_creds", "do_exit"]
    slide = extsyms.slide_of(f, TEXT + 0x1E20_0000)
    assert slide == 0x1E20_0000
    moved = {s.name: s.address for s in extsyms.rebased(f, slide)}
    assert moved == {
        "__per_cpu_start": 0,  # a per-cpu offset: not part of the image mapping
        "_text": TEXT + slide,
        "commit_creds": TEXT + 0x1000 + slide,
        "do_exit": TEXT + 0x2000 + slide,
    }


def test_isf(tmp_path: Path) -> None:
    path = tmp_path / "linux.json"
    path.write_text(json.dumps({"symbols": {"_text": {"address": TEXT}}, "user_types": {}}))
    f = extsyms.load_symbol_file(path)
    assert f.kind == "Volatility 3 ISF" and f.symbols[0].type == "?"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (MAP.replace(" T _text", " T _stext"), "no _text symbol"),
        (f"{0:016x} T _text\n{0:016x} T x\n", "kptr_restrict"),
        ("", "no kernel symbols"),
        ("\xff\xfe", "not a System.map"),
        ("garbage here\n", "line 1"),
    ],
)
def test_bad_files(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.map"
    path.write_bytes(content.encode("latin-1"))
    with pytest.raises(GuestFormatError, match=message) as info:
        f = extsyms.load_symbol_file(path)
        extsyms.slide_of(f, TEXT)
    assert "\n" not in str(info.value)


def test_slide_must_be_a_kaslr_step(tmp_path: Path) -> None:
    path = tmp_path / "System.map"
    path.write_text(MAP)
    f = extsyms.load_symbol_file(path)
    with pytest.raises(GuestFormatError, match="2 MiB"):
        extsyms.slide_of(f, TEXT + 0x1000)
    with pytest.raises(GuestFormatError, match="out of the kernel image"):
        extsyms.rebased(f, 0x4000_0000)
    with pytest.raises(GuestFormatError, match="missing"):
        extsyms.load_symbol_file(tmp_path / "missing")


@pytest.mark.parametrize(
    ("code", "ok"),
    [
        ("0f1f440000" + "4157", True),  # ftrace NOP at +0 (5.10, 6.1)
        ("f30f1efa" + "0f1f440000", True),  # endbr64 + NOP (6.12, 7.3)
        ("0f1f40d6" + "0f1f440000", True),  # 7.3's sealed endbr + NOP
        ("660f1f00" + "6666666690", True),  # 6.12's sealed endbr + the K8 NOP
        ("f30f1efa" + "e8d7fef6ff", True),  # a live ftrace call
        ("4157415641554154", False),  # the middle of a prologue
        ("cccccccccccccccc", False),
    ],
)
def test_entry_problem(code: str, ok: bool) -> None:
    got = extsyms.entry_problem(bytes.fromhex(code).ljust(16, b"\x90"))
    assert (got is None) == ok
