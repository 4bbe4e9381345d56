"""Tests of the kallsyms decoder against tables built here the way ``scripts/kallsyms.c``
lays them out, and against the real Debian kernels.

The encoder below writes the token table (every byte value used in a name is its own
one-character token, the rest are multi-character tokens), the compressed names with
their length bytes, the markers, the token index and the address entries, in the order,
alignment, element sizes and address encoding of each variant from 4.x to 7.x
(``VARIANTS``; see the invariants in ``vmshield.guest.kallsyms``):

- ``4.4``: u64 kallsyms_addresses, num_syms, names, 8-byte markers, tokens, index
- ``4.9``: s32 offsets + relative_base (ABSOLUTE_PERCPU), 8-byte markers and num_syms
- ``5.10``: offsets, relative_base, num_syms, names, markers, token_table, token_index
- ``6.1``: like 5.10 but with ``kallsyms_seqs_of_names`` between markers and token table
  (the Debian 6.1 build), two-byte lengths for long names
- ``6.12``: num_syms, names, markers, token_table, token_index, offsets, relative_base,
  seqs_of_names
- ``6.15``: like 6.12 with unsigned offsets from the first symbol (no ABSOLUTE_PERCPU)
- ``7.x``: like 6.15 without relative_base, offsets place-relative (from each entry's
  own address), every table 4-byte aligned and num_syms a u32 right before the names

The tables are dropped at a random aligned spot of random filler; hypothesis then checks
that the decoder gives back exactly what was encoded, and that corrupting the bytes
gives the original result, a GuestFormatError, or (when only bytes without redundancy
were hit) a well-formed table, and nothing else.
"""

from __future__ import annotations

import multiprocessing
import random
import struct
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from vmshield.errors import GuestFormatError
from vmshield.guest import kallsyms
from vmshield.guest.kallsyms import Decoded, KallsymsTables
from vmshield.guest.vmlinuz import elf_sections, section_bytes
from vmshield.paths import kernels_dir

LAYOUTS = ("4.4", "4.9", "5.10", "6.1", "6.12", "6.15", "7.x")
NAME_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_."
TYPES = "TtDdRrBbA"
KERNEL_BASE = 0xFFFF_FFFF_8100_0000

# --------------------------------------------------------------------------- encoder


@dataclass(frozen=True)
class Sym:
    type: str
    name: str
    address: int
    absolute: bool = False  # a per-cpu symbol: its offset is the address itself


@dataclass
class Encoded:
    """A blob holding kallsyms tables, with what a correct decoder must find in it."""

    blob: bytes
    base_va: int
    layout: str
    symbols: list[Sym]
    relative_base: int
    # blob offsets of each table (keys: offsets, relative_base, num_syms, names, markers,
    # seqs, token_table, token_index) and of the end of the last table
    at: dict[str, int]
    end: int
    # 1 where a byte carries content without redundancy (name payload, token text,
    # offsets, relative base): changing it may change the result without any error
    payload: bytearray
    span: tuple[int, int]  # what KallsymsTables.span() must say
    encoding: str

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.symbols]

    @property
    def types(self) -> str:
        return "".join(s.type for s in self.symbols)

    @property
    def addresses(self) -> list[int]:
        return [s.address for s in self.symbols]


def build_tokens(texts: list[str]) -> list[str]:
    """256 tokens: used bytes (and the digits, the decoder's anchor) map to themselves,
    every other byte value is a multi-character token (frequent substrings first)."""
    used = {ord(c) for t in texts for c in t} | set(range(0x30, 0x3A))
    counts: Counter[str] = Counter()
    for t in texts[:150]:  # a sample is enough to pick useful tokens
        for size in (2, 3, 4):
            counts.update(t[i : i + size] for i in range(len(t) - size + 1))
    multi = [s for s, c in counts.most_common() if c > 1]
    filler = (f"~{i:02x}" for i in range(1000))  # never matched: names have no "~"
    tokens = []
    pick = iter(multi)
    for b in range(256):
        if b in used:
            tokens.append(chr(b))
        else:
            tokens.append(next(pick, None) or next(filler))
    return tokens


def compressor(tokens: list[str]) -> Callable[[str], bytes]:
    """Greedy longest-match compression with ``tokens``."""
    by_text = {t: i for i, t in enumerate(tokens) if not t.startswith("~")}
    longest = max(map(len, by_text))

    def compress(text: str) -> bytes:
        out = bytearray()
        i = 0
        while i < len(text):
            for size in range(min(longest, len(text) - i), 0, -1):
                code = by_text.get(text[i : i + size])
                if code is not None:
                    out.append(code)
                    i += size
                    break
            else:  # pragma: no cover - every used character has its own token
                raise AssertionError(f"no token for {text[i]!r}")
        return bytes(out)

    return compress


def name_entry(data: bytes) -> bytes:
    """Length prefix (one byte, or the 6.1+ two-byte ULEB128 form) and the data."""
    n = len(data)
    if n < 0x80:
        return bytes([n]) + data
    return bytes([0x80 | (n & 0x7F), n >> 7]) + data


@dataclass(frozen=True)
class Variant:
    """How one family of releases lays the tables out."""

    order: tuple[str, ...]
    align: int  # every table label's alignment
    marker_size: int
    encoding: str
    big_names: bool  # two-byte lengths (6.1+)

    @property
    def percpu(self) -> bool:
        """Whether per-cpu symbols are absolute offsets (ABSOLUTE_PERCPU or absolute)."""
        return self.encoding in ("absolute", "relative-percpu")


_OLD = ("offsets", "relative_base", "num_syms", "names", "markers", "token_table", "token_index")
_NEW = ("num_syms", "names", "markers", "token_table", "token_index", "offsets")
VARIANTS = {
    "4.4": Variant(
        ("offsets", "num_syms", "names", "markers", "token_table", "token_index"),
        8,
        8,
        "absolute",
        False,
    ),
    "4.9": Variant(_OLD, 8, 8, "relative-percpu", False),
    "5.10": Variant(_OLD, 8, 4, "relative-percpu", False),
    "6.1": Variant((*_OLD[:5], "seqs", *_OLD[5:]), 8, 4, "relative-percpu", True),
    "6.12": Variant((*_NEW, "relative_base", "seqs"), 8, 4, "relative-percpu", True),
    "6.15": Variant((*_NEW, "relative_base", "seqs"), 8, 4, "relative", True),
    "7.x": Variant((*_NEW, "seqs"), 4, 4, "place-relative", True),
}


def kallsyms_offset(sym: Sym, relative_base: int, encoding: str, entry_va: int) -> int:
    """The ``kallsyms_offsets``/``kallsyms_addresses`` value of a symbol."""
    if encoding == "absolute":
        return sym.address
    if encoding == "relative":
        off = sym.address - relative_base
        assert 0 <= off <= 0xFFFF_FFFF
        return off - (1 << 32) if off >= 1 << 31 else off  # stored as s32 bytes
    if encoding == "place-relative":
        off = sym.address - entry_va
        assert -(1 << 31) <= off < 1 << 31
        return off
    if sym.absolute:
        assert 0 <= sym.address <= 0x7FFF_FFFF
        return sym.address
    off = relative_base - 1 - sym.address
    assert -(1 << 31) <= off < 0, "relative symbol out of int32 reach of the base"
    return off


def encode(
    symbols: list[Sym],
    relative_base: int,
    layout: str,
    *,
    seed: int = 0,
    base_va: int = 0xFFFF_FFFF_8200_0000,
    prefix: int = 64,
    suffix: int = 64,
    avoid_ff: bool = True,
) -> Encoded:
    """Lay the tables out as ``layout`` at the first aligned VA from ``prefix`` bytes of
    random filler, followed by ``suffix`` bytes of filler. The symbols are sorted by
    address first, as scripts/kallsyms.c does."""
    v = VARIANTS[layout]
    rng = random.Random(seed)
    symbols = sorted(symbols, key=lambda s: s.address)
    if not v.percpu:
        assert not any(s.absolute for s in symbols), "no absolute per-cpu symbols here"
    if v.encoding == "relative":
        relative_base = symbols[0].address  # the first symbol
    elif v.encoding in ("absolute", "place-relative"):
        relative_base = 0  # there is none
    texts = [s.type + s.name for s in symbols]
    tokens = build_tokens(texts)
    n = len(symbols)

    compress = compressor(tokens)
    names = bytearray()
    markers = []
    payload_rel: list[tuple[int, int]] = []  # (start, end) inside the names table
    for i, text in enumerate(texts):
        if i % 256 == 0:
            markers.append(len(names))
        data = compress(text)
        assert v.big_names or len(data) < 0x80, "long names need the 6.1+ length form"
        entry = name_entry(data)
        head = 1 if entry[0] < 0x80 else 2
        payload_rel.append((len(names) + head, len(names) + len(entry)))
        names += entry

    token_table = b"".join(t.encode() + b"\0" for t in tokens)
    index = []
    pos = 0
    for t in tokens:
        index.append(pos)
        pos += len(t) + 1
    # kallsyms_seqs_of_names: symbol indices sorted by name (then address), as 3-byte BE
    by_name = sorted(range(n), key=lambda i: (symbols[i].name, symbols[i].address, i))
    seqs = b"".join(i.to_bytes(3, "big") for i in by_name)
    entry_size = 8 if v.encoding == "absolute" else 4
    mcode = "Q" if v.marker_size == 8 else "I"
    num_syms = struct.pack("<I", n) if v.align == 4 else struct.pack("<II", n, 0)
    parts = {
        "offsets": bytes(entry_size * n),  # filled in once its position is known
        "relative_base": struct.pack("<Q", relative_base),
        "num_syms": num_syms,
        "names": bytes(names),
        "markers": struct.pack(f"<{len(markers)}{mcode}", *markers),
        "seqs": seqs,
        "token_table": token_table,
        "token_index": struct.pack("<256H", *index),
    }

    def pad(buf: bytearray) -> None:
        buf += bytes(-(base_va + len(buf)) % v.align)

    lead = prefix + (-(base_va + prefix) % 8)
    blob = bytearray(rng.randbytes(lead))
    at: dict[str, int] = {}
    ends: dict[str, int] = {}
    for key in v.order:
        pad(blob)
        at[key] = len(blob)
        blob += parts[key]
        ends[key] = len(blob)
    pad(blob)
    end = len(blob)
    values = [
        kallsyms_offset(s, relative_base, v.encoding, base_va + at["offsets"] + 4 * i)
        for i, s in enumerate(symbols)
    ]
    offsets = struct.pack(f"<{n}{'Q' if entry_size == 8 else 'i'}", *values)
    blob[at["offsets"] : at["offsets"] + len(offsets)] = offsets
    blob += rng.randbytes(suffix)
    if avoid_ff:
        # Random filler that happens to hold an upper-half address right before
        # num_syms would be read as a 5.10-style relative base (see the layout test).
        head = at[v.order[0]]
        blob[:head] = blob[:head].replace(b"\xff", b"\xfe")
        blob[end:] = blob[end:].replace(b"\xff", b"\xfe")

    mask = bytearray(len(blob))
    for lo, hi in payload_rel:
        mask[at["names"] + lo : at["names"] + hi] = b"\1" * (hi - lo)
    rb_size = 8 if "relative_base" in at else 0
    for lo, size in ((at["offsets"], len(offsets)), (at.get("relative_base", 0), rb_size)):
        mask[lo : lo + size] = b"\1" * size
    for i, b in enumerate(token_table):
        if b:
            mask[at["token_table"] + i] = 1
    tables = [k for k in at if k != "seqs" or layout == "6.1"]
    span = (min(at[k] for k in tables), max(ends[k] for k in tables))
    return Encoded(
        bytes(blob), base_va, layout, symbols, relative_base, at, end, mask, span, v.encoding
    )


# ------------------------------------------------------------------ symbol strategies


def make_symbols(
    rng: random.Random, count: int, relative_base: int, percpu: bool = True
) -> list[Sym]:
    """``count`` symbols: a few per-cpu ones (absolute offsets when ``percpu``, else at
    their place in the image as from 6.15 on), then address order."""
    syms = [Sym("T", "_text", relative_base)]
    n_abs = min(count - 1, rng.randrange(4))
    for i in range(n_abs):
        if percpu:
            syms.append(Sym(rng.choice("DdA"), f"pcpu_{i}", i * 0x40, absolute=True))
        else:
            syms.append(Sym(rng.choice("Dd"), f"pcpu_{i}", relative_base + 0x200_0000 + i * 0x40))
    addr = relative_base
    for _ in range(count - 1 - n_abs):
        addr += rng.randrange(0, 0x4000)
        length = rng.choice((rng.randint(1, 12), rng.randint(1, 40), rng.randint(1, 120)))
        name = "".join(rng.choices(NAME_CHARS, k=length))
        syms.append(Sym(rng.choice(TYPES), name, addr))
    return syms


def tables_va(text: int) -> int:
    """Where the tables go for an image starting at ``text``: 16 MiB above it (the
    decoder checks that _text lies below its tables and less than 1 GiB away)."""
    return text + 0x100_0000


def random_encoded(seed: int, count: int, layout: str, **kw: Any) -> Encoded:
    """A table of ``count`` random symbols in ``layout``, all drawn from ``seed``. Any
    count works in every layout, down to one symbol (the 4.x absolute layout used to get
    at least three: see test_tiny_absolute_table_is_not_read_as_relative)."""
    rng = random.Random(seed)
    rb = KERNEL_BASE + rng.randrange(0, 0x1F0) * 0x20_0000  # a KASLR slide
    syms = make_symbols(rng, count, rb, VARIANTS[layout].percpu)
    base_va = tables_va(rb) + rng.randrange(8)
    return encode(
        syms,
        rb,
        layout,
        seed=seed,
        base_va=base_va,
        prefix=rng.randrange(0, 3000),
        suffix=rng.randrange(0, 3000),
        **kw,
    )


def decode_all(blob: bytes, base_va: int) -> tuple[KallsymsTables, Decoded, list[int]]:
    t = kallsyms.find_tables(blob, base_va)
    d = kallsyms.decode(blob, t)
    return t, d, kallsyms.addresses(d.offsets, t.relative_base, t.encoding, t.va(t.offsets))


def assert_round_trip(enc: Encoded) -> None:
    t, d, addrs = decode_all(enc.blob, enc.base_va)
    assert d.names == enc.names
    assert d.types == enc.types
    assert addrs == enc.addresses
    assert t.num_syms == len(enc.symbols)
    assert t.relative_base == enc.relative_base
    assert t.names == enc.at["names"]
    assert t.markers == enc.at["markers"]
    assert t.token_table == enc.at["token_table"]
    assert t.token_index == enc.at["token_index"]
    assert t.offsets == enc.at["offsets"]
    assert t.relative_base_at == enc.at.get("relative_base", -1)
    assert t.encoding == enc.encoding
    assert t.span() == enc.span


counts = st.one_of(st.integers(1, 40), st.integers(200, 320), st.integers(500, 800), st.just(256))


# ------------------------------------------------------------------------ round trips

explicit_symbols = st.lists(
    st.tuples(st.sampled_from(TYPES), st.text(alphabet=NAME_CHARS, min_size=1, max_size=120)),
    max_size=12,
)


def symbols_for(
    explicit: list[tuple[str, str]], bulk: int, seed: int, layout: str
) -> tuple[list[Sym], int]:
    """The hypothesis-drawn symbols after ``bulk`` seeded random ones; (symbols, base)."""
    rng = random.Random(seed)
    rb = KERNEL_BASE + rng.randrange(0, 0x1F0) * 0x20_0000
    syms = make_symbols(rng, bulk, rb, VARIANTS[layout].percpu) if bulk else []
    if not syms:
        syms = [Sym("T", "_text", rb)]  # every kernel has it (invariant 7)
    addr = max((s.address for s in syms if not s.absolute), default=rb)
    for typ, name in explicit:
        syms.append(Sym(typ, name, addr))
        addr += rng.randrange(0x100)
    return syms, rb


TINY_ABSOLUTE = {  # a per-cpu symbol at 0, then _text and a symbol at the same address
    "explicit": [
        ("A", "V3UpibroWyLP_R3IIxXujtNhyHH13qWKejHNBinSFyIQdpKPSEwT21ebHseA7KiagHK8Dkq4cC_rzpj0")
    ],
    "bulk": 2,
    "seed": 82,
    "base_mod": 6,
    "prefix": 3616,
}


@pytest.mark.parametrize("layout", LAYOUTS)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@example(**TINY_ABSOLUTE)  # 4.4: read as unsigned relative offsets before num_syms
@example(explicit=[], bulk=603, seed=2418, base_mod=0, prefix=0)
@example(
    explicit=[("T", "0")], bulk=0, seed=357, base_mod=0, prefix=0
)  # seed 357: explicit names only
@given(
    explicit=explicit_symbols,
    bulk=st.one_of(st.just(0), counts),
    seed=st.integers(0, 2**32),
    base_mod=st.integers(0, 7),
    prefix=st.integers(0, 4000),
)
def test_round_trip(
    layout: str,
    explicit: list[tuple[str, str]],
    bulk: int,
    seed: int,
    base_mod: int,
    prefix: int,
) -> None:
    syms, rb = symbols_for(explicit, bulk, seed, layout)
    enc = encode(syms, rb, layout, seed=seed, base_va=tables_va(rb) + base_mod, prefix=prefix)
    t0 = time.perf_counter()
    assert_round_trip(enc)
    assert time.perf_counter() - t0 < 2


@pytest.mark.parametrize(
    ("layout", "count"),
    [(layout, count) for layout in LAYOUTS for count in (1, 255, 256, 257, 600, 1400)],
)
def test_round_trip_fixed_sizes(layout: str, count: int) -> None:
    assert_round_trip(random_encoded(count, count, layout))


@pytest.mark.parametrize("layout", ["6.1", "6.12", "6.15", "7.x"])
def test_long_names_use_two_byte_lengths(layout: str) -> None:
    rng = random.Random(5)
    long_name = "".join(rng.choice(NAME_CHARS) for _ in range(300))
    syms = make_symbols(rng, 600, KERNEL_BASE, VARIANTS[layout].percpu)
    syms[400] = Sym("t", long_name, syms[400].address)
    enc = encode(syms, KERNEL_BASE, layout)
    t = kallsyms.find_tables(enc.blob, enc.base_va)
    entry = enc.blob[t.names :]
    pos = 0
    for _ in range(enc.names.index(long_name)):  # encode() sorts by address
        pos += (
            (entry[pos] & 0x7F | entry[pos + 1] << 7) + 2 if entry[pos] & 0x80 else entry[pos] + 1
        )
    assert entry[pos] & 0x80, "the long name did not get a two-byte length"
    assert_round_trip(enc)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_locate_token_table(layout: str) -> None:
    enc = random_encoded(11, 700, layout)
    loc = kallsyms.locate_token_table(enc.blob, enc.base_va)
    assert loc == kallsyms.TokenLocation(enc.at["token_table"], enc.at["token_index"])
    assert kallsyms.locate_token_table(enc.blob[: enc.at["token_table"]], enc.base_va) is None
    assert kallsyms.locate_token_table(bytes(4096), 0) is None


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32), count=counts, layout=st.sampled_from(LAYOUTS))
def test_locate_token_table_property(seed: int, count: int, layout: str) -> None:
    enc = random_encoded(seed, count, layout)
    loc = kallsyms.locate_token_table(enc.blob, enc.base_va)
    assert loc == kallsyms.TokenLocation(enc.at["token_table"], enc.at["token_index"])


def test_tables_not_found_messages() -> None:
    with pytest.raises(GuestFormatError, match="no token table anchor"):
        kallsyms.find_tables(bytes(range(256)) * 16, KERNEL_BASE)
    with pytest.raises(GuestFormatError, match="not found"):
        kallsyms.find_tables(kallsyms.ANCHOR * 3, KERNEL_BASE)
    with pytest.raises(GuestFormatError):
        kallsyms.find_tables(b"", KERNEL_BASE)


def test_addresses() -> None:
    rb = 0xFFFF_FFFF_9A00_0000
    wrap = 1 << 64  # unsigned long arithmetic, as in the kernel: only forged tables wrap
    offs = [0, 0x1_2340, -1, -2, -0x8000_0000, 0x7FFF_FFFF]
    assert kallsyms.addresses(offs, rb) == [
        0,
        0x1_2340,
        rb,
        rb + 1,
        (rb + 0x7FFF_FFFF) % wrap,
        0x7FFF_FFFF,
    ]
    assert kallsyms.addresses(offs, rb, "relative") == [
        rb,
        rb + 0x1_2340,
        (rb + 0xFFFF_FFFF) % wrap,
        (rb + 0xFFFF_FFFE) % wrap,
        (rb + 0x8000_0000) % wrap,
        (rb + 0x7FFF_FFFF) % wrap,
    ]
    low = 0xFFFF_FFFF_0000_0000  # no wrap below the top 4 GiB
    assert kallsyms.addresses([0, -1, -0x8000_0000], low) == [0, low, low + 0x7FFF_FFFF]
    at = 0xFFFF_FFFF_8260_0000
    assert kallsyms.addresses(offs, 0, "place-relative", at) == [
        at,
        at + 4 + 0x1_2340,
        at + 8 - 1,
        at + 12 - 2,
        at + 16 - 0x8000_0000,
        (at + 20 + 0x7FFF_FFFF) % (1 << 64),  # pointer arithmetic wraps, as in the kernel
    ]
    assert kallsyms.addresses([0, 1 << 63], 0, "absolute") == [0, 1 << 63]
    with pytest.raises(ValueError, match="unknown"):
        kallsyms.addresses([], 0, "other")


# ------------------------------------------------------------------------ corruption


def corrupt(enc: Encoded, kind: str, rng: random.Random) -> tuple[bytes, int, set[int]]:
    """A damaged copy of the blob: (bytes, base_va, blob offsets of the changed bytes)."""
    blob = bytearray(enc.blob)
    touched: set[int] = set()
    base_va = enc.base_va
    if kind == "flip":
        for _ in range(rng.randint(1, 6)):
            i = rng.randrange(len(blob))
            blob[i] ^= 1 << rng.randrange(8)
            touched.add(i)
    elif kind in ("zero", "random"):
        i = rng.randrange(len(blob))
        j = min(len(blob), i + rng.choice((1, 4, 8, 64, 700)))
        blob[i:j] = bytes(j - i) if kind == "zero" else rng.randbytes(j - i)
        touched.update(range(i, j))
    elif kind == "truncate":
        i = rng.randrange(len(blob))
        touched.update(range(i, len(blob)))
        del blob[i:]
    else:  # "drop-front": the blob starts later (a read of .rodata from some offset on)
        i = rng.randrange(len(blob))
        touched.update(range(i))
        del blob[:i]
        base_va += i
    return bytes(blob), base_va, touched


def outcome(blob: bytes, base_va: int) -> tuple[list[str], str, list[int]] | None:
    try:
        _, d, addrs = decode_all(blob, base_va)
    except GuestFormatError:
        return None
    return d.names, d.types, addrs


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@example(seed=2418, layout="6.1", count=603, kind="flip")  # the seqs zero taken as markers
@example(seed=1012, layout="4.9", count=19, kind="flip")  # a length flip, then back in step
@given(
    seed=st.integers(0, 2**32),
    layout=st.sampled_from(LAYOUTS),
    count=st.one_of(st.integers(1, 60), st.integers(513, 640)),
    kind=st.sampled_from(["flip", "zero", "random", "truncate", "drop-front"]),
)
def test_corruption_gives_original_or_error(seed: int, layout: str, count: int, kind: str) -> None:
    enc = random_encoded(seed, count, layout)
    original = (enc.names, enc.types, enc.addresses)
    assert outcome(enc.blob, enc.base_va) == original
    blob, base_va, touched = corrupt(enc, kind, random.Random(seed))
    t0 = time.perf_counter()
    got = outcome(blob, base_va)
    assert time.perf_counter() - t0 < 2
    if got is None or got == original:
        return
    # Only bytes without redundancy (name text, token text, offsets, the relative base)
    # can change the result without an error, and the table stays well formed. A name's
    # length byte has only some: the markers pin every 256th entry, num_syms and the
    # aligned end pin the count, so a flip after which the stream falls back into step
    # with as many entries is another valid table (seed 1012 of 4.9 with 19 symbols: a
    # length grows, the following entries re-sync, the last name takes in padding), with
    # the original addresses.
    payload_hit = any(enc.payload[i] for i in touched)
    length_hit = any(
        enc.at["names"] <= i < enc.at["markers"] and not enc.payload[i] for i in touched
    )
    assert payload_hit or length_hit, f"{kind} of structure bytes changed the table"
    names, types, addrs = got
    assert len(names) == len(types) == len(addrs) == count
    if not payload_hit:
        assert addrs == enc.addresses, "a name's length byte changed the addresses"
    for name in names:
        assert name and name.isascii() and name.isprintable() and " " not in name


def test_every_structural_byte_is_checked() -> None:
    """Flipping any single bit of markers, token index, num_syms or a name's length byte
    gives the original table or a GuestFormatError."""
    enc = random_encoded(21, 300, "6.12")
    original = (enc.names, enc.types, enc.addresses)
    starts = {k: v for k, v in enc.at.items() if k in ("num_syms", "markers", "token_index")}
    sizes = {"num_syms": 8, "markers": 8, "token_index": 512}
    positions = [i for k, lo in starts.items() for i in range(lo, lo + sizes[k])]
    positions += [i for i in range(enc.at["names"], enc.at["markers"]) if not enc.payload[i]]
    for i in positions[::3]:
        blob = bytearray(enc.blob)
        blob[i] ^= 1 << (i % 8)
        assert outcome(bytes(blob), enc.base_va) in (None, original), f"offset {i:#x}"


# ------------------------------------------------------------------- found bugs


def test_seqs_zero_read_as_one_marker() -> None:
    # BUG (fixed; was seed=2418 of the property tests): in the 6.1 layout a zero u32 of
    # kallsyms_seqs_of_names (symbol 0's 3-byte index and the next one's high byte) sits
    # right before the token table. _markers_before took it for a one-entry marker
    # array, a names stream of one "symbol" walked to it from the seqs bytes before, and
    # the finder gave up at "no _text symbol" instead of trying the real markers behind.
    assert_round_trip(random_encoded(2418, 603, "6.1"))


@pytest.mark.parametrize("count", [1, 2, 3])
def test_tiny_absolute_table_is_not_read_as_relative(count: int) -> None:
    # BUG (fixed): u64 kallsyms_addresses [0 (a per-cpu symbol), X (_text)] before
    # num_syms read the same as 32-bit offsets [0, 0] with a base X, which the finder
    # tried there in the unsigned "relative" encoding; that encoding (6.15+) only ever
    # follows the token index, and now only is tried there. With a third symbol at X
    # the base plus offset went past 2**64 without wrapping and still looked sorted.
    rb = KERNEL_BASE + 0x40_0000
    syms = [Sym("A", "pcpu_0", 0, absolute=True), Sym("T", "_text", rb)]
    syms += [Sym("t", "same_place", rb)] * (count - 2)
    enc = encode(syms[:count] if count > 1 else syms[1:], rb, "4.4", base_va=tables_va(rb))
    assert_round_trip(enc)
    for n in (1, 2):
        assert_round_trip(random_encoded(n, n, "4.4"))


def test_names_walked_from_inside_an_entry() -> None:
    # BUG (fixed): the names search tries starts from the markers down and took the first
    # stream that walks to the markers. Here the second name's last four codes read as
    # the u32 1, 4-aligned right before the third name: a one-symbol stream walks from
    # there, and the finder stopped at "no _text symbol" instead of going on to the real
    # start (three symbols) four bytes on. Hand-made 7.x tables: code 0 is "zz", code 1
    # is "yy", every other byte value its own character (or "~xx").
    tokens = ["zz", "yy"] + [chr(b) if 0x21 <= b < 0x7F else f"~{b:02x}" for b in range(2, 256)]
    entries = [b"T_text", b"tabb\x01\x00\x00\x00", b"tc"]  # 7 + 9 bytes: the third is aligned
    base_va = tables_va(KERNEL_BASE)
    blob = bytearray(b"\x11" * 12) + struct.pack("<I", len(entries))
    names = len(blob)
    for data in entries:
        blob += bytes([len(data)]) + data
    blob += bytes(-len(blob) % 4)
    markers = len(blob)
    blob += struct.pack("<I", 0)
    token_table = len(blob)
    index, pos = [], 0
    for tok in tokens:
        index.append(pos)
        pos += len(tok) + 1
    blob += b"".join(t.encode() + b"\0" for t in tokens)
    blob += bytes(-len(blob) % 4)
    blob += struct.pack("<256H", *index)
    offsets = len(blob)
    addrs = [KERNEL_BASE, KERNEL_BASE + 0x10, KERNEL_BASE + 0x20]
    blob += struct.pack("<3i", *(a - (base_va + offsets + 4 * i) for i, a in enumerate(addrs)))
    assert struct.unpack_from("<I", blob, names + 12)[0] == 1  # the decoy count
    t, d, got = decode_all(bytes(blob), base_va)
    assert (t.names, t.num_syms, t.markers, t.token_table) == (names, 3, markers, token_table)
    assert d.names == ["_text", "abbyyzzzzzz", "c"]
    assert got == addrs


@pytest.mark.parametrize("count", [1, 200, 256, 400, 1400, 2000])
def test_seqs_layout_any_marker_count(count: int) -> None:
    # BUG (src/vmshield/guest/kallsyms.py, _markers_before / _markers_before_seqs): the
    # 6.1 layout (kallsyms_seqs_of_names between markers and token table) is only found
    # when the number of markers is odd and at least 3, as in the Debian 6.1 build (341):
    # - with one marker (<= 256 symbols) _markers_before_seqs never tries m = 1 (its
    #   range stops at max(1, ...)) and needs three increasing u32s to start; worse,
    #   _markers_before already "finds" the zero u32 of the seqs array/padding before the
    #   token table, so the seqs scan is not even tried;
    # - with an even number of markers there is no zero padding after them, the scan for
    #   increasing values runs on into the seqs bytes (3-byte big-endian indices read as
    #   u32 are usually larger), and only the two longest candidate lengths are tried, so
    #   the real marker count is skipped.
    # find_tables then raises GuestFormatError on a valid table.
    assert_round_trip(random_encoded(count, count, "6.1"))


def test_upper_half_value_before_num_syms_in_6x_layout() -> None:
    # BUG (src/vmshield/guest/kallsyms.py, _tables_from_anchor/_offsets_candidates): the
    # 5.10 placement (offsets, relative_base just before num_syms) is tried first and
    # accepted as soon as the 8 bytes at names-16 look like an upper-half address. In a
    # 6.x layout those bytes belong to whatever precedes kallsyms_num_syms in .rodata; if
    # that is a kernel pointer, find_tables silently returns the wrong offsets and
    # relative base (wrong addresses for every symbol) instead of the real tables that
    # follow the token index. Nothing checks the chosen candidate (for instance that the
    # smallest relative offset is -1, i.e. relative_base is the lowest relative address,
    # as scripts/kallsyms.c makes it).
    rng = random.Random(3)
    syms = make_symbols(rng, 300, KERNEL_BASE)
    enc = encode(syms, KERNEL_BASE, "6.12", prefix=8192)  # room for 300 offsets before
    blob = bytearray(enc.blob)
    at = enc.at["num_syms"] - 8
    blob[at : at + 8] = struct.pack("<Q", 0xFFFF_FFFF_8234_5678)  # e.g. a function pointer
    got = outcome(bytes(blob), enc.base_va)
    assert got in (None, (enc.names, enc.types, enc.addresses))


def _find_tables_in_child(blob: bytes, base_va: int, conn: Any) -> None:
    try:
        kallsyms.find_tables(blob, base_va)
        conn.send("ok")
    except GuestFormatError:
        conn.send("GuestFormatError")
    except Exception as e:  # reported to the parent, which fails the test
        conn.send(f"{type(e).__name__}: {e}")


def run_bounded(target: Callable[..., None], args: tuple[Any, ...], seconds: float) -> str | None:
    """Run ``target(*args, conn)`` in a forked child; its message, or None on timeout."""
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=target, args=(*args, child))
    proc.start()
    try:
        if parent.poll(seconds):
            return str(parent.recv())
        return None
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join()


def test_forged_names_region_does_not_hang() -> None:
    # BUG (src/vmshield/guest/kallsyms.py, _find_names): every 8-aligned candidate start
    # in the ~131 kB window below the last marker whose preceding 8 bytes look like
    # (num_syms, 0) is walked with _walk_names, each walk up to num_syms entries or up to
    # the markers. A guest that fills that window with the 8-byte unit
    # 07 7f 00 00 00 00 00 00 (num_syms 32519 for 128 markers, which also reads as one
    # 7-byte name) next to a forged marker array and token table makes find_tables do
    # ~16k walks of 16-32k entries each: about 100 s of CPU for this 264 kB blob, and the
    # cost grows with window x names size (hours for a few MB of forged .rodata).
    m, step = 128, 1024
    tokens = build_tokens(["Tforged"])
    table = b"".join(t.encode() + b"\0" for t in tokens)
    index, pos = [], 0
    for t in tokens:
        index.append(pos)
        pos += len(t) + 1
    unit = struct.pack("<II", 256 * (m - 1) + 7, 0)
    region = (m - 1) * step + 256 * 514 + 64
    blob = unit * (region // 8) + struct.pack(f"<{m}I", *(k * step for k in range(m)))
    blob += bytes(-len(blob) % 8) + table + bytes(-len(table) % 8)
    blob += struct.pack("<256H", *index)
    result = run_bounded(_find_tables_in_child, (blob, KERNEL_BASE), 30.0)
    assert result is not None, (
        "find_tables ran for more than 30 s (unbounded: about 100 s) on a 264 kB blob"
    )
    assert result in ("ok", "GuestFormatError")


# ------------------------------------------------------------------- real kernels

REAL_COUNTS = {"5.10": 96995, "6.1": 87182, "6.12": 157881, "7.3": 197553}
REAL_ENCODINGS = {
    "5.10": "relative-percpu",
    "6.1": "relative-percpu",
    "6.12": "relative-percpu",
    "7.3": "place-relative",
}


def real_rodata(spec: str) -> tuple[bytes, int]:
    path: Path = kernels_dir() / spec / "vmlinux"
    if not path.is_file():
        pytest.fail(
            f"the decompressed kernel {path} is missing: run `make setup` to fetch the "
            "test kernels",
            pytrace=False,
        )
    elf = path.read_bytes()
    return section_bytes(elf, ".rodata"), elf_sections(elf)[".rodata"].addr


@pytest.mark.parametrize("spec", sorted(REAL_COUNTS))
def test_real_kernel(spec: str) -> None:
    rodata, base = real_rodata(spec)
    t, d, addrs = decode_all(rodata, base)
    assert t.num_syms == len(d.names) == len(addrs) == REAL_COUNTS[spec]
    assert t.encoding == REAL_ENCODINGS[spec]
    if t.encoding == "relative-percpu":
        assert t.relative_base == KERNEL_BASE  # vmlinux is linked at the default base
    assert addrs == sorted(addrs)
    by_name = dict(zip(d.names, addrs, strict=True))
    assert by_name["_text"] == KERNEL_BASE
    assert d.types[d.names.index("_text")] == "T"
    banner = by_name["linux_banner"]
    assert base <= banner < base + len(rodata)
    assert rodata[banner - base :].startswith(b"Linux version " + spec.encode())
    assert by_name["_stext"] < by_name["schedule"] < by_name["_etext"]
    assert by_name["_sinittext"] <= by_name["start_kernel"] < by_name["_einittext"]
    assert set(d.types) <= set("AaBbDdRrTtVvWw")
    loc = kallsyms.locate_token_table(rodata, base)
    assert loc == kallsyms.TokenLocation(t.token_table, t.token_index)


@pytest.mark.parametrize("spec", sorted(REAL_COUNTS))
def test_real_kernel_cut_short_says_what_was_found(spec: str) -> None:
    """A kernel the finder cannot read gives one line: what it found, where, and which
    table it missed (here the addresses, cut off; then the names, zeroed)."""
    rodata, base = real_rodata(spec)
    t = kallsyms.find_tables(rodata, base)
    if t.offsets > t.token_table:
        blob = rodata[: t.offsets + 64]
    else:
        blob = rodata[: t.offsets + 64] + bytes(t.relative_base_at - t.offsets - 64)
        blob += rodata[t.relative_base_at :]
    with pytest.raises(GuestFormatError) as info:
        kallsyms.find_tables(blob, base)
    line = str(info.value)
    assert "\n" not in line and line.startswith("kallsyms tables not found")
    for table, at in (
        ("kallsyms_token_table", t.token_table),
        ("kallsyms_markers", t.markers),
        ("kallsyms_names", t.names),
    ):
        assert f"{table} at {t.va(at):#x}" in line
    assert f"kallsyms_num_syms at {t.va(t.num_syms_at):#x} ({t.num_syms})" in line
    assert "missed: no kallsyms_offsets/kallsyms_addresses" in line

    names = bytearray(rodata)
    names[t.names + 4096 : t.names + 8192] = bytes(4096)
    with pytest.raises(GuestFormatError) as info:
        kallsyms.find_tables(bytes(names), base)
    line = str(info.value)
    assert "\n" not in line and "kallsyms_token_index at" in line
    assert "missed: kallsyms_names" in line
