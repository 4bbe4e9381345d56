"""Tests of the per-build symbol cache and of the symbol table it feeds.

The kallsyms blob comes from the test-side encoder of test_kallsyms_synthetic; a cached
entry must only be used for the exact same tables (the relocated relative base aside),
and any damaged cache file must read as "not cached", never as an exception.
"""

from __future__ import annotations

import json
import random
import struct
from pathlib import Path
from typing import Any

import pytest

from tests.unit.test_kallsyms_synthetic import (
    KERNEL_BASE,
    VARIANTS,
    Encoded,
    Sym,
    encode,
    make_symbols,
)
from vmshield.errors import GuestFormatError, SymbolError
from vmshield.guest import kallsyms
from vmshield.guest.symbols import Symbol
from vmshield.guest.symcache import FORMAT, MAX_BTF_VARIANTS, CachedBuild, SymbolCache
from vmshield.guest.symtab import SymbolTable

KEY = "3f" * 32  # stands for the SHA-256 of the token table and index


def sample(layout: str = "5.10", count: int = 600) -> Encoded:
    rng = random.Random(42)
    syms = make_symbols(rng, count, KERNEL_BASE, VARIANTS[layout].percpu)
    syms[5] = Sym("T", "start_kernel", syms[5].address)
    return encode(syms, KERNEL_BASE, layout, seed=42, prefix=4000)


def build_of(enc: Encoded, key: str = KEY) -> CachedBuild:
    t = kallsyms.find_tables(enc.blob, enc.base_va)
    return CachedBuild.from_decoded(key, enc.blob, t, kallsyms.decode(enc.blob, t))


def with_bytes(blob: bytes, at: int, new: bytes) -> bytes:
    b = bytearray(blob)
    b[at : at + len(new)] = new
    return bytes(b)


# --------------------------------------------------------------------------- cache


@pytest.mark.parametrize("layout", ["4.9", "5.10", "6.1", "6.12", "6.15", "7.x"])
def test_round_trip(tmp_path: Path, layout: str) -> None:
    enc = sample(layout)
    build = build_of(enc)
    assert build.dirty
    assert build.span == enc.span
    assert build.rb_at == enc.at.get("relative_base", -1)
    assert (build.encoding, build.offsets_at) == (enc.encoding, enc.at["offsets"])
    cache = SymbolCache(tmp_path / "symtab")
    cache.store(build)  # creates the folder
    assert not build.dirty
    assert [p.name for p in (tmp_path / "symtab").iterdir()] == [f"{KEY}.json"]
    loaded = cache.load(KEY, enc.blob)
    assert loaded is not None
    assert loaded.names == enc.names
    assert loaded.types == enc.types
    assert loaded.addresses(enc.blob, enc.base_va) == enc.addresses
    assert (loaded.key, loaded.span, loaded.span_sha256, loaded.rb_at, loaded.encoding) == (
        build.key,
        build.span,
        build.span_sha256,
        build.rb_at,
        build.encoding,
    )
    assert loaded.layouts == {} and not loaded.dirty


def test_missing_entry_and_other_key(tmp_path: Path) -> None:
    enc = sample()
    cache = SymbolCache(tmp_path)
    assert cache.load(KEY, enc.blob) is None
    cache.store(build_of(enc))
    assert cache.load("00" * 32, enc.blob) is None
    # a file whose content names another key than its file name
    (tmp_path / f"{'11' * 32}.json").write_text((tmp_path / f"{KEY}.json").read_text())
    assert cache.load("11" * 32, enc.blob) is None


def test_changed_table_bytes_miss(tmp_path: Path) -> None:
    enc = sample()
    cache = SymbolCache(tmp_path)
    cache.store(build_of(enc))
    assert cache.load(KEY, enc.blob) is not None
    for where in ("names", "markers", "token_table", "token_index", "offsets", "num_syms"):
        at = enc.at[where] + 3
        flipped = with_bytes(enc.blob, at, bytes([enc.blob[at] ^ 0x01]))
        assert cache.load(KEY, flipped) is None, where
    # shorter than the span (the guest's .rodata read was cut)
    assert cache.load(KEY, enc.blob[: enc.end - 1]) is None
    # bytes outside the span do not matter
    outside = with_bytes(enc.blob, enc.end + 5, b"\x00\x01")
    assert cache.load(KEY, with_bytes(outside, 3, b"zz")) is not None


@pytest.mark.parametrize("layout", ["5.10", "6.12"])
def test_relocated_relative_base_still_matches(tmp_path: Path, layout: str) -> None:
    enc = sample(layout)
    cache = SymbolCache(tmp_path)
    cache.store(build_of(enc))
    slide = 0x1A40_0000  # another KASLR slide on the next boot
    moved = with_bytes(enc.blob, enc.at["relative_base"], struct.pack("<Q", KERNEL_BASE + slide))
    loaded = cache.load(KEY, moved)
    assert loaded is not None
    rb = loaded.relative_base(moved)
    assert rb == KERNEL_BASE + slide
    expected = [
        a if s.absolute else a + slide for s, a in zip(enc.symbols, enc.addresses, strict=True)
    ]
    assert kallsyms.addresses(loaded.offsets, rb) == expected


def test_place_relative_table_moves_with_the_image(tmp_path: Path) -> None:
    """7.x: nothing in the tables is relocated, so the same bytes match after another
    KASLR slide, and the addresses follow where the tables are now."""
    enc = sample("7.x")
    cache = SymbolCache(tmp_path)
    cache.store(build_of(enc))
    loaded = cache.load(KEY, enc.blob)
    assert loaded is not None and loaded.rb_at == -1 and loaded.relative_base(enc.blob) == 0
    slide = 0x1A40_0000
    assert loaded.addresses(enc.blob, enc.base_va + slide) == [a + slide for a in enc.addresses]


CORRUPT_FILES = [
    "",
    "{",
    '{"format": 1, "key": "',
    "not json at all",
    "\x00\x01\x02",
]


@pytest.mark.parametrize("text", CORRUPT_FILES)
def test_corrupt_files_miss(tmp_path: Path, text: str) -> None:
    enc = sample()
    cache = SymbolCache(tmp_path)
    (tmp_path / f"{KEY}.json").write_text(text)
    assert cache.load(KEY, enc.blob) is None


def test_truncated_file_misses(tmp_path: Path) -> None:
    enc = sample()
    cache = SymbolCache(tmp_path)
    cache.store(build_of(enc))
    path = tmp_path / f"{KEY}.json"
    full = path.read_text()
    for cut in (1, len(full) // 3, len(full) // 2, len(full) - 1):
        path.write_text(full[:cut])
        assert cache.load(KEY, enc.blob) is None, cut


def edited_entry(tmp_path: Path, enc: Encoded, **changes: Any) -> SymbolCache:
    cache = SymbolCache(tmp_path)
    cache.store(build_of(enc))
    path = tmp_path / f"{KEY}.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))
    return cache


@pytest.mark.parametrize(
    "changes",
    [
        {"format": FORMAT + 1},
        {"format": "1"},
        {"format": None},
        {"offsets": "!!not base64!!"},
        {"offsets": "AAA="},  # 2 bytes: not a whole int32
        {"types": "T"},  # arrays of different lengths
        {"rb_at": "x"},
        {"layouts": {"task_struct.pid": "x"}},
    ],
)
def test_other_format_or_inconsistent_entry_misses(tmp_path: Path, changes: dict[str, Any]) -> None:
    enc = sample()
    cache = edited_entry(tmp_path, enc, **changes)
    assert cache.load(KEY, enc.blob) is None


@pytest.mark.parametrize("text", ["[]", "null", "1", '"a string"'])
def test_valid_json_of_another_shape_misses(tmp_path: Path, text: str) -> None:
    # BUG (src/vmshield/guest/symcache.py, SymbolCache.load / CachedBuild.from_json):
    # from_json trusts the shape of the JSON. A cache file that is valid JSON but not an
    # object ("[]", "null", "1", a string) makes it call d.get(...) on a list/None/int/
    # str (AttributeError); see also test_entry_with_wrong_field_types_misses. load()
    # only catches OSError, ValueError, KeyError, TypeError and GuestFormatError, so a
    # damaged cache file crashes the attach instead of reading as "not cached".
    enc = sample()
    cache = SymbolCache(tmp_path)
    (tmp_path / f"{KEY}.json").write_text(text)
    assert cache.load(KEY, enc.blob) is None


@pytest.mark.parametrize(
    "changes",
    [
        {"names": 5},  # AttributeError: int has no .split
        {"span": [0]},  # IndexError
        {"layouts": [1, 2]},  # AttributeError: list has no .items
    ],
)
def test_entry_with_wrong_field_types_misses(tmp_path: Path, changes: dict[str, Any]) -> None:
    # BUG: same as test_valid_json_of_another_shape_misses, for fields of the wrong type.
    enc = sample()
    cache = edited_entry(tmp_path, enc, **changes)
    assert cache.load(KEY, enc.blob) is None


def test_from_json_rejects_another_format() -> None:
    with pytest.raises(GuestFormatError, match="another format"):
        CachedBuild.from_json({"format": 0})


BTF_A = "a1" * 32  # stand for SHA-256 digests of two different BTF blobs
BTF_B = "b2" * 32


def test_layouts_are_filed_per_btf_hash_and_stored(tmp_path: Path) -> None:
    enc = sample()
    build = build_of(enc)
    cache = SymbolCache(tmp_path)
    cache.store(build)
    build.remember(BTF_A, "task_struct.pid", 0x5C8)
    build.remember(BTF_A, "sizeof:task_struct", 0x2A40)
    assert build.dirty
    cache.store(build)
    loaded = cache.load(KEY, enc.blob)
    assert loaded is not None and not loaded.dirty
    assert loaded.layouts == {BTF_A: {"task_struct.pid": 0x5C8, "sizeof:task_struct": 0x2A40}}
    assert loaded.layout(BTF_A, "task_struct.pid") == 0x5C8
    assert loaded.layout(BTF_B, "task_struct.pid") is None  # other BTF: nothing known
    loaded.remember(BTF_B, "task_struct.pid", 0x10)
    assert loaded.layout(BTF_A, "task_struct.pid") == 0x5C8
    assert loaded.layout(BTF_B, "task_struct.pid") == 0x10
    with pytest.raises(ValueError):
        loaded.remember("not-a-hash", "x.y", 1)


def test_btf_variants_are_bounded(tmp_path: Path) -> None:
    enc = sample()
    build = build_of(enc)
    digests = [f"{i:064x}" for i in range(MAX_BTF_VARIANTS + 3)]
    for i, d in enumerate(digests):
        build.remember(d, "task_struct.pid", i)
    assert list(build.layouts) == digests[-MAX_BTF_VARIANTS:]
    cache = SymbolCache(tmp_path)
    cache.store(build)
    loaded = cache.load(KEY, enc.blob)
    assert loaded is not None and loaded.layouts == build.layouts


@pytest.mark.parametrize(
    "layouts",
    [
        {"task_struct.pid": 8},  # the old format: not keyed by BTF hash
        {BTF_A: {"task_struct.pid": "8"}},
        {BTF_A: {"task_struct.pid": True}},
        {BTF_A: [1]},
        {"zz" * 32: {"x.y": 1}},
        {f"{i:064x}": {} for i in range(MAX_BTF_VARIANTS + 1)},
    ],
)
def test_bad_layouts_miss(tmp_path: Path, layouts: Any) -> None:
    enc = sample()
    cache = edited_entry(tmp_path, enc, layouts=layouts)
    assert cache.load(KEY, enc.blob) is None


def test_store_replaces_and_leaves_no_temp_files(tmp_path: Path) -> None:
    enc = sample()
    cache = SymbolCache(tmp_path)
    build = build_of(enc)
    cache.store(build)
    build.remember(BTF_A, "x.y", 8)
    cache.store(build)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{KEY}.json"]
    loaded = cache.load(KEY, enc.blob)
    assert loaded is not None and loaded.layouts == {BTF_A: {"x.y": 8}}


# --------------------------------------------------------------------- SymbolTable

PERCPU = 0x1_F000


def small_table() -> SymbolTable:
    names = ["fixed_percpu_data", "_text", "startup_64", "do_one", "do_one", "_etext", "jiffies"]
    addrs = [
        0,
        KERNEL_BASE,
        KERNEL_BASE,
        KERNEL_BASE + 0x1000,
        KERNEL_BASE + 0x2000,
        KERNEL_BASE + 0xE0_0000,
        KERNEL_BASE + 0x160_5000,
    ]
    return SymbolTable(names, addrs, "DTTttTD")


def test_symbol_table_lookups() -> None:
    t = small_table()
    assert len(t) == 7
    assert "startup_64" in t and "nope" not in t
    assert t.get("_text") == Symbol("_text", KERNEL_BASE, "T")
    assert t.get("nope") is None
    assert t.address("jiffies") == KERNEL_BASE + 0x160_5000
    assert t.address("do_one") == KERNEL_BASE + 0x1000  # the first of that name
    assert [s.address for s in t.all_named("do_one")] == [
        KERNEL_BASE + 0x1000,
        KERNEL_BASE + 0x2000,
    ]
    assert t.first("nope", "_etext", "_text") == Symbol("_etext", KERNEL_BASE + 0xE0_0000, "T")
    assert next(iter(t)) == Symbol("fixed_percpu_data", 0, "D")


def test_symbol_table_missing_names() -> None:
    t = small_table()
    with pytest.raises(SymbolError, match="no symbol 'init_task'"):
        t.address("init_task")
    with pytest.raises(SymbolError, match="none of the symbols a, b"):
        t.first("a", "b")
    with pytest.raises(SymbolError):
        t.first()


def test_symbol_table_address_lookup() -> None:
    t = small_table()
    hit = t.lookup(KERNEL_BASE + 0x1010)
    assert hit == (Symbol("do_one", KERNEL_BASE + 0x1000, "t"), 0x10)
    hit = t.lookup(KERNEL_BASE + 0x2000)
    assert hit == (Symbol("do_one", KERNEL_BASE + 0x2000, "t"), 0)
    sym, off = t.lookup(KERNEL_BASE + 5) or (None, None)
    assert sym is not None and sym.address == KERNEL_BASE and off == 5
    assert t.lookup(KERNEL_BASE + 0x2000_0000) == (
        Symbol("jiffies", KERNEL_BASE + 0x160_5000, "D"),
        0x2000_0000 - 0x160_5000,
    )
    assert t.lookup(KERNEL_BASE - 1) is None
    assert t.lookup(PERCPU) is None  # per-cpu offsets are not kernel addresses
    assert t.lookup(0) is None


def test_symbol_table_kallsyms_lines() -> None:
    lines = list(small_table().kallsyms_lines())
    assert lines[0] == "0000000000000000 D fixed_percpu_data"
    assert lines[1] == "ffffffff81000000 T _text"
    assert lines[-1] == "ffffffff82605000 D jiffies"
    assert len(lines) == 7


def test_symbol_table_from_symbols_and_length_check() -> None:
    syms = [Symbol("a", KERNEL_BASE, "T"), Symbol("b", KERNEL_BASE + 8, "t")]
    t = SymbolTable.from_symbols(syms)
    assert list(t) == syms
    with pytest.raises(ValueError):
        SymbolTable(["a"], [1, 2], "T")


def test_symbol_table_from_cache(tmp_path: Path) -> None:
    enc = sample("6.12", 700)
    cache = SymbolCache(tmp_path)
    cache.store(build_of(enc))
    loaded = cache.load(KEY, enc.blob)
    assert loaded is not None
    addrs = loaded.addresses(enc.blob, enc.base_va)
    table = SymbolTable(loaded.names, addrs, loaded.types)
    assert table.address("start_kernel") == enc.symbols[5].address
    assert table.address("_text") == KERNEL_BASE
    target = enc.symbols[300]
    sym, off = table.lookup(target.address + 1) or (None, None)
    assert sym is not None and off is not None
    assert sym.address + off == target.address + 1 and sym.address <= target.address + 1
    lines = list(table.kallsyms_lines())
    assert lines[5] == f"{enc.symbols[5].address:016x} T start_kernel"
