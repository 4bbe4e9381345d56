"""How much the kallsyms search reads, on forged and on real bytes.

Regression: ``_markers_before_seqs`` (the 6.1 layout, markers then
``kallsyms_seqs_of_names`` then the token table) read the whole candidate marker array,
m ~ (table - p) / 772 u32s, at every aligned zero u32 of its 6 MB window: about 66k
candidates and 200M reads, 65-90 s, on the Debian 6.1 .rodata, and quadratic in the
window on forged data. These tests count the reads through wrappers of the module's two
u32 readers (``_u32`` and ``_u32_words``) and stop a run as soon as it goes over a
linear budget, so a quadratic search fails fast and no result depends on timing.
"""

from __future__ import annotations

import itertools
import random
import struct
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit.test_kallsyms_synthetic import REAL_COUNTS, decode_all, random_encoded, real_rodata
from vmshield.guest import kallsyms

MAX_MARKERS = kallsyms.MAX_SYMS // 256 + 2


class TooMuchWork(Exception):
    """Raised by the counting readers once the budget is spent (not caught by the code)."""


class Budget:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.reads = 0

    def take(self) -> None:
        self.reads += 1
        if self.reads > self.limit:
            raise TooMuchWork(f"more than {self.limit} u32 reads")


class CountingWords:
    """A ``_u32_words`` result that charges every index to the budget."""

    def __init__(self, words: Sequence[int], budget: Budget) -> None:
        self._words = words
        self._budget = budget

    def __getitem__(self, i: int) -> int:
        self._budget.take()
        return self._words[i]

    def __len__(self) -> int:
        return len(self._words)


@pytest.fixture
def budget(monkeypatch: pytest.MonkeyPatch) -> Callable[[int], Budget]:
    """``budget(limit)``: count (and cap) every u32 the kallsyms module reads from then on."""

    def install(limit: int) -> Budget:
        b = Budget(limit)
        u32 = kallsyms._u32
        words = getattr(kallsyms, "_u32_words", None)

        def counted_u32(blob: Any, off: int) -> int:
            b.take()
            return u32(blob, off)

        def counted_words(blob: bytes, start: int, count: int) -> CountingWords:
            assert words is not None
            return CountingWords(words(blob, start, count), b)

        monkeypatch.setattr(kallsyms, "_u32", counted_u32)
        monkeypatch.setattr(kallsyms, "_u32_words", counted_words, raising=False)
        return b

    return install


def linear_budget(window: int) -> int:
    """Reads allowed for a scan of ``window`` bytes: one per aligned position, one per u32
    that extends an increasing run (runs from different zeros never overlap), one that
    ends each run, and the (at most six) marker arrays handed out."""
    return window // 8 + window // 4 + window // 8 + 6 * MAX_MARKERS


# ------------------------------------------------------------------ forged windows

GUARD = 4096  # nonzero u32s right below the table: no short marker array fits there


def words_blob(words: list[int]) -> bytes:
    return struct.pack(f"<{len(words)}I", *words) + b"\x01" * GUARD


def zeros(size: int) -> bytes:
    return bytes(size) + b"\x01" * GUARD


def short_runs(size: int, k: int) -> bytes:
    """0, 1, ..., k-1 repeated: a candidate at every run start, none long enough."""
    return words_blob([i % k for i in range(size // 4)])


def just_short(size: int) -> bytes:
    """At each aligned start, a zero and then one increasing u32 fewer than the smallest
    marker count its distance to the table allows: every candidate is read to its end."""
    table = size + GUARD
    words: list[int] = []
    while len(words) * 4 < size:
        gap = table - 4 * len(words)
        r = max(1, max(1, (gap - 8) // 772) - 1)
        words += range(r)
        if len(words) % 2:
            words.append(0)  # an unaligned zero: ends the run, is no candidate
    return words_blob(words[: size // 4])


def random_sparse(size: int) -> bytes:
    """Random u32s with a zero at every other aligned position."""
    rng = random.Random(7)
    return words_blob([0 if i % 4 == 0 else rng.getrandbits(32) for i in range(size // 4)])


FORGED: dict[str, Callable[[int], bytes]] = {
    "zeros": zeros,
    "runs-of-2": lambda size: short_runs(size, 2),
    "runs-of-4": lambda size: short_runs(size, 4),
    "just-short": just_short,
    "random-sparse": random_sparse,
}


@pytest.mark.parametrize("pattern", sorted(FORGED))
@pytest.mark.parametrize("base_mod", [0, 4])  # which u32s are 8-aligned candidates
def test_seqs_scan_is_linear_on_forged_window(
    pattern: str, base_mod: int, budget: Callable[[int], Budget]
) -> None:
    # 1 MB before the table: the quadratic scan read ~80M u32s of the zero window.
    blob = FORGED[pattern](1 << 20)
    b = budget(linear_budget(len(blob)))
    found = list(kallsyms._markers_before_seqs(blob, len(blob), 0xFFFF_FFFF_8200_0000 + base_mod))
    assert b.reads <= linear_budget(len(blob))
    for p, vals in found:  # whatever it hands out is a strictly increasing array from 0
        assert vals[0] == 0 and all(x < y for x, y in itertools.pairwise(vals))
        assert list(struct.unpack_from(f"<{len(vals)}I", blob, p)) == vals


def test_seqs_scan_whole_window_is_linear(budget: Callable[[int], Budget]) -> None:
    # The largest table the window allows (MAX_SYMS symbols, 7813 markers) behind 6 MB
    # of zero seqs: found at the far end of the window, in linear time.
    n = kallsyms.MAX_SYMS
    m = -(-n // 256)
    markers = struct.pack(f"<{m}I", *(k * 4000 for k in range(m)))
    seqs = bytes(3 * n - GUARD) + b"\x01" * GUARD
    blob = markers + bytes(-len(markers) % 8) + seqs + bytes(-len(seqs) % 8)
    b = budget(linear_budget(len(blob)))
    found = list(kallsyms._markers_before_seqs(blob, len(blob), 0))
    assert [(p, len(vals)) for p, vals in found] == [(0, m)]
    assert b.reads <= linear_budget(len(blob))


# ------------------------------------------------------------- same answers as before


def reference_markers_before_seqs(
    blob: bytes, table: int, base_va: int
) -> list[tuple[int, list[int]]]:
    """The former (quadratic) search, kept as the specification of what is found."""
    u32 = kallsyms._u32
    found: list[tuple[int, list[int]]] = []
    lo = max(0, table - 3 * kallsyms.MAX_SYMS - 4 * (kallsyms.MAX_SYMS // 256 + 1) - 16)
    p = table - ((base_va + table) % 8) - 8
    while p >= lo and len(found) < 4:
        if u32(blob, p) == 0:
            gap = table - p
            for m in range(max(1, (gap - 8) // 772), (gap + 768) // 772 + 2):
                seqs = kallsyms._align8(p + 4 * m, base_va)
                rest = table - seqs
                if rest < 0:
                    break
                n_lo, n_hi = max(1, -(-(rest - 7) // 3)), rest // 3
                if max(n_lo, 256 * (m - 1) + 1) > min(n_hi, 256 * m):
                    continue
                vals = [u32(blob, p + 4 * i) for i in range(m)]
                if all(vals[i] < vals[i + 1] for i in range(m - 1)):
                    found.append((p, vals))
        p -= 8
    return found


def block_words(kind: str, size: int, rng: random.Random) -> Iterator[int]:
    if kind == "zeros":
        yield from [0] * size
    elif kind == "run":  # a plausible marker array
        v = 0
        for _ in range(size):
            yield v
            v += rng.randrange(1, 3000)
    elif kind == "small":
        yield from (rng.randrange(3) for _ in range(size))
    else:
        yield from (rng.getrandbits(32) for _ in range(size))


blocks = st.lists(
    st.tuples(
        st.sampled_from(["zeros", "run", "small", "random"]),
        st.one_of(st.integers(1, 8), st.integers(9, 60)),
    ),
    min_size=1,
    max_size=120,
)


def pack_blocks(blocks: list[tuple[str, int]], rng: random.Random) -> bytes:
    words = [w for kind, size in blocks for w in block_words(kind, size, rng)]
    return struct.pack(f"<{len(words)}I", *words)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    before=blocks,
    seqs_fill=st.one_of(st.just([]), blocks),  # none: random bytes
    m=st.integers(1, 40),
    flaw=st.one_of(st.none(), st.integers(1, 39)),
    seed=st.integers(0, 2**32),
    base_mod=st.integers(0, 7),
    tail=st.integers(0, 40),
)
def test_seqs_scan_matches_reference(
    before: list[tuple[str, int]],
    seqs_fill: list[tuple[str, int]],
    m: int,
    flaw: int | None,
    seed: int,
    base_mod: int,
    tail: int,
) -> None:
    # Filler, a 6.1-style marker array of m entries (maybe with one entry not increasing),
    # a seqs array of 3 bytes per symbol made of more filler, then the table; the search
    # must hand out exactly what the former one did, in the same order.
    rng = random.Random(seed)
    base_va = 0xFFFF_FFFF_8200_0000 + base_mod
    blob = bytearray(pack_blocks(before, rng))
    blob += bytes(-(base_va + len(blob)) % 8)
    markers = [0]
    for k in range(1, m):
        markers.append(markers[-1] if k == flaw else markers[-1] + rng.randrange(1, 3000))
    blob += struct.pack(f"<{m}I", *markers)
    blob += bytes(-(base_va + len(blob)) % 8)
    n = 256 * (m - 1) + 1 + rng.randrange(256)
    fill = pack_blocks(seqs_fill, rng) or rng.randbytes(3 * n)
    blob += (fill * (3 * n // len(fill) + 1))[: 3 * n]
    blob += bytes(-(base_va + len(blob)) % 8)
    table = len(blob)
    blob += rng.randbytes(tail)
    for end in {table, len(blob), rng.randrange(len(blob) + 1)}:
        got = list(kallsyms._markers_before_seqs(bytes(blob), end, base_va))
        assert got == reference_markers_before_seqs(bytes(blob), end, base_va)


@pytest.mark.parametrize("count", [1, 256, 513, 1100, 1792])
def test_seqs_layout_with_zero_filler_is_found_cheaply(
    count: int, budget: Callable[[int], Budget]
) -> None:
    # A 6.1 layout after 512 kB of zeros (page padding, say): found, and cheaply.
    enc = random_encoded(count, count, "6.1")
    pad = 512 << 10
    blob, base_va = bytes(pad) + enc.blob, enc.base_va - pad
    b = budget(linear_budget(len(blob)))
    t, d, _ = decode_all(blob, base_va)
    assert (t.markers, d.names) == (pad + enc.at["markers"], enc.names)
    assert b.reads <= linear_budget(len(blob))


# ------------------------------------------------------------------- real kernels


@pytest.mark.parametrize("spec", sorted(REAL_COUNTS))
def test_real_kernel_search_reads_little(spec: str, budget: Callable[[int], Budget]) -> None:
    # Debian 6.1 took ~200M reads (65-90 s) before; every kernel now needs well under 100k.
    rodata, base = real_rodata(spec)
    b = budget(200_000)
    t = kallsyms.find_tables(rodata, base)
    assert t.num_syms == REAL_COUNTS[spec]
    assert b.reads <= 200_000
