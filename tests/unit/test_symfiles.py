"""Tests of the symbol table importers (/proc/kallsyms, System.map, Volatility ISF).

The samples are written in the exact formats those files have on a Debian x86-64 guest;
the fuzz tests hold every importer to its contract on hostile input: a list of symbols or
a GuestFormatError, never any other exception.
"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmshield.errors import GuestFormatError
from vmshield.guest.symbols import (
    KSYM_NAME_LEN,
    MAX_SYMBOL_NAME,
    UNKNOWN_TYPE,
    Symbol,
    addresses_hidden,
    format_kallsyms_line,
    symbol_problem,
)
from vmshield.guest.symfiles import (
    MAX_LINE_LENGTH,
    isf_struct_offsets,
    load_isf,
    parse_proc_kallsyms,
    parse_system_map,
    parse_volatility_isf,
)

# An excerpt of /proc/kallsyms of a Debian 6.1 cloud guest, read as root: per-cpu symbols
# (small addresses), text/data/rodata/bss of the core kernel, then module symbols with the
# tab-separated [module] column (upper case = exported by the module).
KALLSYMS = """\
0000000000000000 A fixed_percpu_data
0000000000001000 A cpu_number
000000000001a140 A runqueues
ffffffff81000000 T startup_64
ffffffff81000000 T _stext
ffffffff81000000 T _text
ffffffff81000040 T secondary_startup_64
ffffffff81000045 T secondary_startup_64_no_verify
ffffffff81000170 t verify_cpu
ffffffff810002a0 T __startup_64
ffffffff81001000 T __switch_to_asm
ffffffff810a2b40 W arch_cpu_idle_enter
ffffffff810c6d30 t __do_sys_getpid
ffffffff81c01cb0 T entry_SYSCALL_64
ffffffff82000000 R linux_banner
ffffffff82001f00 r __func__.3
ffffffff826011a0 R sys_call_table
ffffffff82a13940 D init_task
ffffffff82a1cf00 d tick_broadcast_device
ffffffff82e62000 B jiffies_64
ffffffff82e63010 b dmesg_restrict
ffffffffc0402000 t virtblk_probe\t[virtio_blk]
ffffffffc0405060 d virtio_blk\t[virtio_blk]
ffffffffc04d1000 t ext4_has_free_clusters\t[ext4]
ffffffffc04d1230 T ext4_claim_free_clusters\t[ext4]
ffffffffc0582f20 d ext4_fs_type\t[ext4]
ffffffffc0590000 t jbd2_journal_start_reserved\t[jbd2]
ffffffffc05a4100 T jbd2__journal_start\t[jbd2]
"""

# The same kernel's System.map (nm -n vmlinux): no module column, and link-time symbols
# (absolute 'A' symbols, section markers) that /proc/kallsyms does not show.
SYSTEM_MAP = """\
0000000000000000 D __per_cpu_start
0000000000000000 D fixed_percpu_data
00000000000001e0 A kexec_control_code_size
0000000001000000 A phys_startup_64
ffffffff81000000 T _stext
ffffffff81000000 T _text
ffffffff81000000 T startup_64
ffffffff81000170 t verify_cpu
ffffffff82a13940 D init_task
ffffffff82e62000 B __bss_start
ffffffff82e62000 B jiffies_64
ffffffff83200000 B __brk_base
ffffffff83400000 B _end
"""

HIDDEN = """\
0000000000000000 T startup_64
0000000000000000 T _stext
0000000000000000 t verify_cpu
0000000000000000 t ext4_has_free_clusters\t[ext4]
"""


def _isf_document() -> dict[str, Any]:
    """A Volatility 3 ISF the way dwarf2json writes one for a Linux kernel."""
    return {
        "metadata": {
            "linux": {"symbols": [{"kind": "system-map", "name": "System.map-6.1.0-50"}]},
            "producer": {"name": "dwarf2json", "version": "0.8.0"},
            "format": "6.2.0",
        },
        "base_types": {
            "int": {"kind": "int", "size": 4, "signed": True, "endian": "little"},
            "long unsigned int": {"kind": "int", "size": 8, "signed": False, "endian": "little"},
        },
        "user_types": {
            "list_head": {
                "kind": "struct",
                "size": 16,
                "fields": {
                    "next": {"offset": 0, "type": {"kind": "pointer"}},
                    "prev": {"offset": 8, "type": {"kind": "pointer"}},
                },
            },
            "task_struct": {
                "kind": "struct",
                "size": 9792,
                "fields": {
                    "__state": {"offset": 24, "type": {"kind": "base", "name": "int"}},
                    "tasks": {
                        "offset": 2240,
                        "type": {"kind": "struct", "name": "list_head"},
                    },
                    "pid": {"offset": 2464, "type": {"kind": "base", "name": "int"}},
                    "comm": {"offset": 3016, "type": {"kind": "array", "count": 16}},
                },
            },
            "unnamed_union_1": {"kind": "union", "size": 8, "fields": {}},
        },
        "enums": {},
        "symbols": {
            "init_task": {
                "address": 0xFFFFFFFF82A13940,
                "type": {"kind": "struct", "name": "task_struct"},
            },
            "linux_banner": {"address": 0xFFFFFFFF82000000},
            "_text": {"address": 0xFFFFFFFF81000000},
        },
    }


# ----------------------------------------------------------------------------- Symbol


def test_symbol_validates_fields() -> None:
    Symbol("x" * MAX_SYMBOL_NAME, 0, "T")
    for args in [
        ("", 0, "T", None),
        ("x" * KSYM_NAME_LEN, 0, "T", None),
        ("has space", 0, "T", None),
        ("new\nline", 0, "T", None),
        ("caf\u00e9", 0, "T", None),
        ("ok", -1, "T", None),
        ("ok", 1 << 64, "T", None),
        ("ok", 0, "TT", None),
        ("ok", 0, "", None),
        ("ok", 0, " ", None),
        ("ok", 0, "T", ""),
        ("ok", 0, "T", "a]b"),
        ("ok", 0, "T", "m" * 56),
    ]:
        with pytest.raises(GuestFormatError):
            Symbol(*args)
        assert symbol_problem(*args) is not None


def test_symbol_problem_names_the_kernel_limit() -> None:
    message = symbol_problem("a" * 600, 0, "T", None)
    assert message is not None and "511" in message and "KSYM_NAME_LEN 512" in message


def test_format_kallsyms_line_matches_the_kernel() -> None:
    assert format_kallsyms_line(Symbol("_text", 0xFFFFFFFF81000000, "T")) == (
        "ffffffff81000000 T _text"
    )
    assert format_kallsyms_line(Symbol("cpu_number", 0x1000, "A")) == (
        "0000000000001000 A cpu_number"
    )
    assert format_kallsyms_line(Symbol("ext4_fs_type", 0xFFFFFFFFC0582F20, "d", "ext4")) == (
        "ffffffffc0582f20 d ext4_fs_type\t[ext4]"
    )


# ----------------------------------------------------------------------- /proc/kallsyms


def test_parse_proc_kallsyms_sample() -> None:
    symbols = parse_proc_kallsyms(KALLSYMS)
    assert len(symbols) == KALLSYMS.count("\n")
    assert symbols[0] == Symbol("fixed_percpu_data", 0, "A")
    assert symbols[3] == Symbol("startup_64", 0xFFFFFFFF81000000, "T")
    assert Symbol("__func__.3", 0xFFFFFFFF82001F00, "r") in symbols
    assert Symbol("arch_cpu_idle_enter", 0xFFFFFFFF810A2B40, "W") in symbols
    assert symbols[-1] == Symbol("jbd2__journal_start", 0xFFFFFFFFC05A4100, "T", "jbd2")
    modules = {s.module for s in symbols}
    assert modules == {None, "virtio_blk", "ext4", "jbd2"}
    assert not addresses_hidden(symbols)


def test_kallsyms_round_trip_is_exact() -> None:
    symbols = parse_proc_kallsyms(KALLSYMS)
    assert "".join(format_kallsyms_line(s) + "\n" for s in symbols) == KALLSYMS
    assert parse_proc_kallsyms("\n".join(map(format_kallsyms_line, symbols))) == symbols


def test_hidden_addresses_are_kept_and_reported() -> None:
    symbols = parse_proc_kallsyms(HIDDEN)
    assert [s.name for s in symbols] == [
        "startup_64",
        "_stext",
        "verify_cpu",
        "ext4_has_free_clusters",
    ]
    assert symbols[-1].module == "ext4"
    assert addresses_hidden(symbols)
    assert addresses_hidden(tuple(symbols))
    assert not addresses_hidden([])
    assert not addresses_hidden([*symbols, Symbol("_text", 0xFFFFFFFF81000000, "T")])


def test_kallsyms_tolerates_crlf_blank_lines_and_other_blanks() -> None:
    text = "ffffffff81000000 T _text\r\n\n   \nffffffff81000170  t\tverify_cpu \t[mod]\n"
    assert parse_proc_kallsyms(text) == [
        Symbol("_text", 0xFFFFFFFF81000000, "T"),
        Symbol("verify_cpu", 0xFFFFFFFF81000170, "t", "mod"),
    ]
    assert parse_proc_kallsyms("") == []
    assert parse_proc_kallsyms("ffffffff81000000 T _text") == [
        Symbol("_text", 0xFFFFFFFF81000000, "T")
    ]


@pytest.mark.parametrize(
    ("bad_line", "fragment"),
    [
        ("ffffffff81000000 T", "2 columns"),
        ("ffffffff81000000 T a b c", "5 columns"),
        ("0xffffffff8100000 T _text", "hex digits"),
        ("+fffffff81000000 T _text", "hex digits"),
        ("ffff_ffff8100000 T _text", "hex digits"),
        ("1ffffffff81000000 T _text", "hex digits"),
        ("ffffffff81000000 TT _text", "type"),
        ("ffffffff81000000 T _text ext4", "[module]"),
        ("ffffffff81000000 T _text\t[]", "[module]"),
        ("ffffffff81000000 T _text\t[a[b]", "module name"),
        ("ffffffff81000000 T caf\u00e9", "non-ASCII"),
        ("ffffffff81000000 T \x1b[31mred", "control"),
        ("ffffffff81000000 T " + "n" * 512, "longer than the kernel's limit"),
    ],
)
def test_kallsyms_errors_name_file_and_line(bad_line: str, fragment: str) -> None:
    text = "ffffffff81000000 T _text\nffffffff81000040 T secondary_startup_64\n" + bad_line
    with pytest.raises(GuestFormatError) as info:
        parse_proc_kallsyms(text, source="guest-kallsyms.txt")
    message = str(info.value)
    assert message.startswith("guest-kallsyms.txt: line 3: ")
    assert fragment in message


def test_kallsyms_accepts_the_longest_kernel_name() -> None:
    name = "r" * MAX_SYMBOL_NAME
    [sym] = parse_proc_kallsyms(f"ffffffff81000000 t {name}\t[{'m' * 55}]\n")
    assert sym.name == name and sym.module == "m" * 55


def test_overlong_line_is_refused_without_scanning_it_all() -> None:
    text = "ffffffff81000000 T _text\n" + "a" * (50 * 1024 * 1024)
    with pytest.raises(GuestFormatError, match=r"line 2: longer than \d+ characters"):
        parse_proc_kallsyms(text)
    with pytest.raises(GuestFormatError, match="line 1"):
        parse_proc_kallsyms("f" * (MAX_LINE_LENGTH + 1) + "\n")


def test_parsers_reject_non_text() -> None:
    with pytest.raises(GuestFormatError, match="expected text"):
        parse_proc_kallsyms(b"ffffffff81000000 T _text\n")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- System.map


def test_parse_system_map_sample() -> None:
    symbols = parse_system_map(SYSTEM_MAP)
    assert len(symbols) == 13
    assert symbols[3] == Symbol("phys_startup_64", 0x1000000, "A")
    assert symbols[-1] == Symbol("_end", 0xFFFFFFFF83400000, "B")
    assert all(s.module is None for s in symbols)
    assert "".join(format_kallsyms_line(s) + "\n" for s in symbols) == SYSTEM_MAP


def test_system_map_has_no_module_column() -> None:
    with pytest.raises(GuestFormatError, match=r"System.map: line 2: 4 columns, expected 3"):
        parse_system_map("ffffffff81000000 T _text\nffffffffc04d1000 t f\t[ext4]\n")


# ---------------------------------------------------------------------------------- ISF


def test_parse_isf_symbols_and_layouts() -> None:
    text = json.dumps(_isf_document(), indent=1)
    symbols = parse_volatility_isf(text)
    assert symbols == [
        Symbol("init_task", 0xFFFFFFFF82A13940, UNKNOWN_TYPE),
        Symbol("linux_banner", 0xFFFFFFFF82000000, UNKNOWN_TYPE),
        Symbol("_text", 0xFFFFFFFF81000000, UNKNOWN_TYPE),
    ]
    assert parse_volatility_isf(text.encode()) == symbols
    offsets = isf_struct_offsets(text)
    assert offsets["task_struct"] == {"__state": 24, "tasks": 2240, "pid": 2464, "comm": 3016}
    assert offsets["list_head"] == {"next": 0, "prev": 8}
    assert offsets["unnamed_union_1"] == {}


@pytest.mark.parametrize(
    "compress",
    [
        lambda raw: lzma.compress(raw, format=lzma.FORMAT_XZ),
        gzip.compress,
        bz2.compress,
        lambda raw: b"\xef\xbb\xbf" + raw,  # UTF-8 BOM
    ],
    ids=["xz", "gzip", "bzip2", "bom"],
)
def test_isf_compressed_forms(compress: Any) -> None:
    data = compress(json.dumps(_isf_document()).encode())
    assert [s.name for s in parse_volatility_isf(data)] == ["init_task", "linux_banner", "_text"]
    assert isf_struct_offsets(data)["list_head"]["prev"] == 8


def test_isf_decoded_once_serves_both_functions() -> None:
    doc = load_isf(lzma.compress(json.dumps(_isf_document()).encode()))
    assert len(parse_volatility_isf(doc)) == 3
    assert set(isf_struct_offsets(doc)) == {"list_head", "task_struct", "unnamed_union_1"}


def _with(path: list[str], value: Any) -> str:
    """The sample ISF with the value at ``path`` replaced (or removed when ``...``)."""
    doc: Any = _isf_document()
    node = doc
    for key in path[:-1]:
        node = node[key]
    if value is ...:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return json.dumps(doc)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        (_with(["symbols"], ...), "'symbols' is missing"),
        (_with(["symbols"], []), "'symbols' is a list"),
        (_with(["symbols", "init_task"], 5), "symbols['init_task']: is a int"),
        (_with(["symbols", "init_task", "address"], ...), "symbols['init_task']: 'address'"),
        (_with(["symbols", "init_task", "address"], "0xffff"), "not an integer"),
        (_with(["symbols", "init_task", "address"], True), "not an integer"),
        (_with(["symbols", "init_task", "address"], 1.5), "not an integer"),
        (_with(["symbols", "init_task", "address"], -1), "64 bits"),
        (_with(["symbols", "init_task", "address"], 1 << 64), "64 bits"),
        (_with(["symbols", "x" * 512], {"address": 1}), "longer than the kernel's limit"),
        (_with(["symbols", "bad name"], {"address": 1}), "whitespace"),
        ("[]", "top level is a JSON list"),
        ('{"symbols": {}', "invalid JSON at line 1 column"),
        ('{\n  "symbols": {\n    "a": {"address": 1},\n  }\n}', "line 4 column 3"),
        ("[" * 200_000 + "]" * 200_000, "JSON"),
        ('{"symbols": {"a": {"address": ' + "9" * 5000 + "}}}", "invalid JSON value"),
    ],
)
def test_isf_symbol_errors(text: str, fragment: str) -> None:
    with pytest.raises(GuestFormatError) as info:
        parse_volatility_isf(text, source="linux-6.1.json")
    assert str(info.value).startswith("linux-6.1.json: ")
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        (_with(["user_types"], ...), "'user_types' is missing"),
        (_with(["user_types", "list_head"], "x"), "user_types['list_head']: is a str"),
        (_with(["user_types", "list_head", "fields"], ...), "'fields' is missing"),
        (_with(["user_types", "list_head", "fields", "next"], []), "fields['next']: is a list"),
        (_with(["user_types", "list_head", "fields", "next", "offset"], -8), "'offset'"),
        (_with(["user_types", "list_head", "fields", "next", "offset"], 1 << 40), "'offset'"),
        (_with(["user_types", "list_head", "fields", "next", "offset"], None), "'offset'"),
        (_with(["user_types", "bad\x07"], {"fields": {}}), "invalid name"),
    ],
)
def test_isf_layout_errors(text: str, fragment: str) -> None:
    with pytest.raises(GuestFormatError) as info:
        isf_struct_offsets(text)
    assert fragment in str(info.value)


def test_isf_binary_errors() -> None:
    with pytest.raises(GuestFormatError, match="not UTF-8 at byte offset 2"):
        parse_volatility_isf(b'{"\xff": 1}')
    xz = lzma.compress(json.dumps(_isf_document()).encode(), format=lzma.FORMAT_XZ)
    with pytest.raises(GuestFormatError, match=r"truncated|corrupt"):
        parse_volatility_isf(xz[: len(xz) // 2])
    with pytest.raises(GuestFormatError, match="trailing data after the xz stream at offset"):
        parse_volatility_isf(xz + b"junk")
    with pytest.raises(GuestFormatError, match="corrupt gzip"):
        parse_volatility_isf(b"\x1f\x8b" + b"\x00" * 30)
    with pytest.raises(GuestFormatError, match="expected bytes or text"):
        parse_volatility_isf(12)  # type: ignore[arg-type]


def test_isf_decompression_bomb_is_cut_off() -> None:
    bomb = lzma.compress(b" " * (4 * 1024 * 1024), format=lzma.FORMAT_XZ)
    assert len(bomb) < 4096
    with pytest.raises(GuestFormatError, match="decompresses to more than 1048576 bytes"):
        parse_volatility_isf(bomb, max_size=1024 * 1024)
    with pytest.raises(GuestFormatError, match="decompresses to more than"):
        parse_volatility_isf(gzip.compress(b" " * 4096), max_size=1024)
    with pytest.raises(GuestFormatError, match="larger than 10 characters"):
        parse_volatility_isf('{"symbols": {}}', max_size=10)
    with pytest.raises(GuestFormatError, match="larger than 10 bytes"):
        parse_volatility_isf(b'{"symbols": {}}', max_size=10)


# ------------------------------------------------------------------------------- fuzzing

_names = st.text(
    alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=40
)
_modules = st.none() | st.text(
    alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="[]"),
    min_size=1,
    max_size=55,
)
_symbols = st.builds(
    Symbol,
    name=_names,
    address=st.integers(min_value=0, max_value=(1 << 64) - 1),
    type=st.sampled_from("TtDdRrBbAWwVvUu?"),
    module=_modules,
)


@given(st.lists(_symbols, max_size=30))
def test_round_trip_of_any_valid_table(symbols: list[Symbol]) -> None:
    text = "".join(format_kallsyms_line(s) + "\n" for s in symbols)
    assert parse_proc_kallsyms(text) == symbols
    core = [s for s in symbols if s.module is None]
    assert parse_system_map("".join(format_kallsyms_line(s) + "\n" for s in core)) == core


def _either_list_or_format_error(parse: Any, data: Any) -> None:
    try:
        result = parse(data)
    except GuestFormatError:
        return
    assert isinstance(result, list | dict)


@given(st.text(max_size=2000))
def test_fuzz_text_tables(text: str) -> None:
    _either_list_or_format_error(parse_proc_kallsyms, text)
    _either_list_or_format_error(parse_system_map, text)


@given(st.data())
def test_fuzz_mutated_kallsyms(data: st.DataObject) -> None:
    text = KALLSYMS
    for _ in range(data.draw(st.integers(1, 6))):
        at = data.draw(st.integers(0, len(text)))
        junk = data.draw(st.text(max_size=5))
        cut = data.draw(st.integers(0, 3))
        text = text[:at] + junk + text[at + cut :]
    _either_list_or_format_error(parse_proc_kallsyms, text)


@given(st.binary(max_size=2000))
def test_fuzz_isf_bytes(data: bytes) -> None:
    _either_list_or_format_error(parse_volatility_isf, data)
    _either_list_or_format_error(isf_struct_offsets, data)


@given(st.binary(max_size=300))
def test_fuzz_compressed_isf_headers(tail: bytes) -> None:
    for magic in (b"\xfd7zXZ\x00", b"\x1f\x8b", b"BZh"):
        _either_list_or_format_error(parse_volatility_isf, magic + tail)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=6,
)
_entries = st.dictionaries(
    st.text(max_size=10),
    st.dictionaries(st.sampled_from(["address", "offset", "fields", "type"]), _json, max_size=3),
    max_size=4,
)


@given(
    st.dictionaries(
        st.sampled_from(["symbols", "user_types", "metadata"]),
        _entries | _json,
        max_size=3,
    )
)
def test_fuzz_isf_structure(doc: dict[str, Any]) -> None:
    text = json.dumps(doc)
    _either_list_or_format_error(parse_volatility_isf, text)
    _either_list_or_format_error(isf_struct_offsets, text)
    _either_list_or_format_error(parse_volatility_isf, doc)
