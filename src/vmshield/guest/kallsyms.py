"""Decode the kernel's own symbol table (kallsyms) from raw bytes of its read-only data.

Why by structure: stock distribution kernels ship no System.map, and the vmcoreinfo note
that names the tables on 6.x kernels is missing on 5.10 and forgeable everywhere. The
tables ``scripts/kallsyms.c`` generates have moved around between releases (4.x to 7.x:
new tables, a different order, other element sizes and alignment, four ways of encoding
an address), so the search does not follow any one release's layout. It relies only on
what every release has kept, checks each table against the others, and tries the few
known placements of the one table that moves (the addresses).

Invariants the search relies on (all releases from 4.x to 7.x):

1. ``kallsyms_token_table`` holds 256 non-empty NUL-terminated tokens, and every byte
   value that occurs in a symbol name keeps its own one-character token, so
   ``"0\\0" "1\\0" ... "9\\0"`` sits at token 0x30. That run is the anchor.
2. ``kallsyms_token_index`` (256 u16 offsets of the tokens) follows the token table at
   the next 4- or 8-byte boundary (8 before 7.0, where every table label had
   ``.balign 8`` on 64-bit; 4 from 7.0). Its first entry is 0 and each entry is where
   the previous token ends: the index and the table verify each other completely.
3. ``kallsyms_markers`` (the byte offset in the names of every 256th symbol: 0 first,
   strictly increasing; u32 in 5.x and later, ``unsigned long`` in older 4.x) ends where the token
   table begins (modulo alignment), except on 6.2-6.3 where the 3-byte-per-symbol
   ``kallsyms_seqs_of_names`` sits between them.
4. ``kallsyms_names`` (a length-prefixed entry per symbol; two-byte ULEB128 lengths for
   long names since 6.1) ends right before the markers (which start at the next 4- or
   8-byte boundary), and the markers must agree with the entry boundaries it decodes to.
5. ``kallsyms_num_syms`` comes right before the names: a u32 directly before them
   (7.0+, 4-byte alignment), or an 8-byte slot (``unsigned long``, or a u32 padded to
   8) before 7.0. Its value n satisfies 256(m-1) < n <= 256m for m markers.
6. The addresses are n entries either after the token index (6.4+) or before
   ``kallsyms_num_syms`` (up to 6.3), encoded one of four ways:

   - ``absolute``: u64 ``kallsyms_addresses`` (before 4.6, or !KALLSYMS_BASE_RELATIVE);
   - ``relative-percpu``: s32 ``kallsyms_offsets`` with ``kallsyms_relative_base``
     (KALLSYMS_ABSOLUTE_PERCPU, x86-64 SMP 4.6-6.14): non-negative values are per-cpu
     offsets, negative ones count down from the base; the base is the lowest relative
     address, so -1 occurs;
   - ``relative``: u32 offsets from ``kallsyms_relative_base`` (6.15-6.19, after
     ABSOLUTE_PERCPU was dropped); the base is the first symbol, so the first offset is 0;
   - ``place-relative``: s32 offsets from the entry's own address (7.0+, "kallsyms: Get
     rid of kallsyms relative base"); there is no base any more, and nothing in the
     tables is relocated by KASLR.

   Whatever the encoding, scripts/kallsyms.c sorts the symbols by address, so decoded
   addresses never decrease: only the right placement and encoding give a sorted table
   (plus the encoding's own property above, and kernel-half addresses).
7. The table has a ``_text`` symbol (type T or t), and it decodes to the start of the
   image: in the kernel half, 2 MiB aligned (x86-64's CONFIG_PHYSICAL_ALIGN; KASLR
   moves the image in those steps), below the tables (text precedes read-only data) and
   less than the 1 GiB image size below them. This is what makes even a table of a few
   symbols unambiguous.

Every candidate is verified end to end, so forged or corrupt tables give a
:class:`GuestFormatError`, never a wrong table; and a candidate that fails late (no
``_text``, no addresses) does not end the search: small tables offer decoys that pass
the early checks (a zero in ``kallsyms_seqs_of_names`` read as a one-entry marker array,
a names stream walked from inside one of its own entries), and the real table is the
next candidate. One work bound covers all candidates of a token table. When nothing is
found, the error is one line saying which tables were found (for the candidate that got
furthest) and which one was missed. Pure: bytes in, symbols out.
"""

from __future__ import annotations

import itertools
import operator
import struct
import sys
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from vmshield.errors import GuestFormatError

ANCHOR = b"".join(bytes([c, 0]) for c in b"0123456789")
MAX_SYMS = 2_000_000
KSYM_NAME_LEN = 512
_MAX_ANCHORS = 16
KERNEL_HALF = 0xFFFF_8000_0000_0000
_MASK64 = (1 << 64) - 1

ENCODINGS = ("absolute", "relative-percpu", "relative", "place-relative")
"""How ``kallsyms_offsets``/``kallsyms_addresses`` encode an address (invariant 6)."""


@dataclass(frozen=True)
class KallsymsTables:
    """Where the tables sit, as offsets into the scanned blob (and so addresses)."""

    base_va: int  # virtual address of blob[0]
    num_syms: int
    names: int
    markers: int
    num_markers: int
    token_table: int
    token_index: int
    offsets: int
    relative_base: int  # value, not position (0 when the encoding has none)
    relative_base_at: int  # -1 when the encoding has no relative base
    names_end: int
    encoding: str = "relative-percpu"
    num_syms_at: int = -1
    marker_size: int = 4

    def va(self, off: int) -> int:
        return self.base_va + off

    @property
    def entry_size(self) -> int:
        """Bytes per address entry: 8 for ``kallsyms_addresses``, else 4."""
        return 8 if self.encoding == "absolute" else 4

    def span(self) -> tuple[int, int]:
        """Blob offsets ``[lo, hi)`` covering every table (for hashing the build)."""
        num_at = self.num_syms_at if self.num_syms_at >= 0 else self.names - 8
        lo = min(self.offsets, num_at)
        hi = max(self.token_index + 512, self.offsets + self.entry_size * self.num_syms)
        if self.relative_base_at >= 0:
            lo = min(lo, self.relative_base_at)
            hi = max(hi, self.relative_base_at + 8)
        return lo, hi

    @property
    def layout(self) -> str:
        """A short description of the variant found (for ``vmshield doctor``)."""
        where = "after the token index" if self.offsets > self.token_table else "before names"
        parts = [self.encoding, f"addresses {where}"]
        if self.markers + 4 * self.num_markers < self.token_table - 8:
            parts.append("seqs_of_names before the token table")
        if self.marker_size == 8:
            parts.append("8-byte markers")
        if self.num_syms_at == self.names - 4:
            parts.append("4-byte aligned")
        return ", ".join(parts)


def _u32(b: memoryview | bytes, off: int) -> int:
    return int(struct.unpack_from("<I", b, off)[0])


_U32_CODE = next(c for c in "IL" if array(c).itemsize == 4)


def _u32_words(blob: bytes, start: int, count: int) -> Sequence[int]:
    """``count`` little-endian u32s from ``blob[start:]``, cheap to index (an array)."""
    words = array(_U32_CODE, blob[start : start + 4 * count])
    if sys.byteorder != "little":
        words.byteswap()
    return words


def _align8(x: int, base_va: int) -> int:
    return x + (-(base_va + x) % 8)


def _align4(x: int, base_va: int) -> int:
    return x + (-(base_va + x) % 4)


class _Progress:
    """What the search found so far from one anchor, for a one-line error."""

    def __init__(self, base_va: int) -> None:
        self.base_va = base_va
        self.found: list[str] = []

    def add(self, what: str, off: int, extra: str = "") -> None:
        self.found.append(f"{what} at {self.base_va + off:#x}{extra}")


def _tokens_at(blob: bytes, start: int, count: int, limit: int) -> tuple[list[bytes], int]:
    """``count`` NUL-terminated strings from ``start``; (tokens, end offset)."""
    toks = []
    pos = start
    for _ in range(count):
        end = blob.find(b"\0", pos, min(len(blob), pos + limit))
        if end < 0:
            raise GuestFormatError(f"kallsyms token at {pos:#x} is not terminated")
        toks.append(blob[pos:end])
        pos = end + 1
    return toks, pos


def _index_at(blob: bytes, anchor: int, index_at: int, tail_end: int) -> tuple[int, list[bytes]]:
    """Check a token index candidate at ``index_at``: (token table offset, tokens)."""
    if index_at + 512 > len(blob):
        raise GuestFormatError("kallsyms token index runs past the data")
    index = struct.unpack_from("<256H", blob, index_at)
    table = anchor - index[0x30]
    if index[0] != 0 or table < 0 or index[0x30] == 0:
        raise GuestFormatError("kallsyms token index does not start at 0")
    tokens, end = _tokens_at(blob, table, 256, 256)
    if end != tail_end:
        raise GuestFormatError("kallsyms token table and index disagree")
    pos = 0
    for i, tok in enumerate(tokens):
        if index[i] != pos or not tok:
            raise GuestFormatError(f"kallsyms token {i} is not where the index says")
        pos += len(tok) + 1
    return table, tokens


def _check_token_table(blob: bytes, anchor: int, base_va: int) -> tuple[int, int, list[bytes]]:
    """Given the ``"0\\0..9\\0"`` run at ``anchor``: (token_table, token_index, tokens).

    The index follows the table at the next 4-byte (7.0+) or 8-byte boundary: both are
    tried (when they differ, at most one can verify: the other reads padding as index[0]
    and the real index[0] as index[2])."""
    _, tail_end = _tokens_at(blob, anchor, 256 - 0x30, 256)
    first: GuestFormatError | None = None
    for index_at in dict.fromkeys((_align4(tail_end, base_va), _align8(tail_end, base_va))):
        try:
            table, tokens = _index_at(blob, anchor, index_at, tail_end)
        except (GuestFormatError, struct.error, IndexError) as e:
            if first is None:
                first = e if isinstance(e, GuestFormatError) else GuestFormatError(str(e))
            continue
        return table, index_at, tokens
    assert first is not None
    raise first


def _markers_before(blob: bytes, table: int, base_va: int) -> list[tuple[int, list[int]]]:
    """Candidate u32 marker arrays ending at ``table`` (maybe padded): (start, markers)."""
    found = []
    for pad in (0, 4):
        vals: list[int] = []
        pos = table - pad - 4
        while pos >= 0 and len(vals) < MAX_SYMS // 256 + 2:
            v = _u32(blob, pos)
            if vals and v >= vals[-1]:
                break
            vals.append(v)
            if v == 0:
                if (base_va + pos) % 4 == 0:
                    found.append((pos, vals[::-1]))
                break
            pos -= 4
    return found


def _markers_before_u64(blob: bytes, table: int, base_va: int) -> list[tuple[int, list[int]]]:
    """Candidate ``unsigned long`` marker arrays (older 4.x) ending at ``table``."""
    vals: list[int] = []
    pos = table - 8
    while pos >= 0 and len(vals) < MAX_SYMS // 256 + 2:
        v = int(struct.unpack_from("<Q", blob, pos)[0])
        if vals and v >= vals[-1]:
            return []
        vals.append(v)
        if v == 0:
            return [(pos, vals[::-1])] if (base_va + pos) % 8 == 0 and len(vals) > 1 else []
        pos -= 8
    return []


def _name_len(blob: bytes, pos: int) -> tuple[int, int]:
    n = blob[pos]
    if n & 0x80:  # 6.1+: big symbol names, two-byte ULEB128 length
        return (n & 0x7F) | (blob[pos + 1] << 7), pos + 2
    return n, pos + 1


def _walk_names(
    blob: bytes, start: int, count: int, stop: int, markers: list[int]
) -> tuple[int, int]:
    """Walk ``count`` length-prefixed entries from ``start``, checking every 256th
    against the markers as it goes: (end offset, or -1 when the walk failed; entries
    walked). A wrong start usually fails within its first block; the count is what the
    caller's work bound charges, however far a forged stream got."""
    pos = start
    n_blob = len(blob)
    for i in range(count):
        if pos >= stop or pos >= n_blob:
            return -1, i
        if i & 0xFF == 0 and pos - start != markers[i >> 8]:
            return -1, i
        n, pos = _name_len(blob, pos) if pos + 1 < n_blob else (0, pos)
        if n == 0 or n > KSYM_NAME_LEN:
            return -1, i
        pos += n
    return pos, count


def _num_syms_before(blob: bytes, s: int, base_va: int, m: int) -> tuple[int, int] | None:
    """(n, position of kallsyms_num_syms) when the bytes before ``s`` hold a plausible
    symbol count for m markers: a u32 right before (7.0+) or an 8-byte slot (before)."""
    lo, hi = 256 * (m - 1), 256 * m
    if s >= 4 and (base_va + s) % 4 == 0:
        n = _u32(blob, s - 4)
        if lo < n <= hi:
            return n, s - 4
    if s >= 8 and (base_va + s) % 8 == 0 and _u32(blob, s - 4) == 0:
        n = _u32(blob, s - 8)
        if lo < n <= hi:
            return n, s - 8
    return None


class _Work:
    """The search's work bound for one token table: entries decoded (names walked, the
    ``_text`` scan, address entries read) over every candidate tried, so forged data
    that offers many near-misses cannot make the search quadratic."""

    LIMIT = 4 * MAX_SYMS

    def __init__(self) -> None:
        self.spent = 0

    def charge(self, entries: int) -> None:
        self.spent += entries
        if self.spent > self.LIMIT:
            raise _WorkExceeded(
                f"the kallsyms search exceeded its work bound ({self.LIMIT} entries decoded)"
            )


class _WorkExceeded(GuestFormatError):
    """The work bound ran out: the search stops here instead of trying more candidates."""


def _names_candidates(
    blob: bytes, markers_at: int, markers: list[int], base_va: int, work: _Work
) -> Iterator[tuple[int, int, int, int]]:
    """(names start, num_syms, num_syms position, names end) consistent with the markers,
    nearest the markers first. Several may be: a small table's stream can also be walked
    from inside one of its own entries whose last bytes read as a count (or from filler
    before it), so the caller verifies each one against ``_text`` and the addresses and
    takes the first that holds, instead of the first that merely walks."""
    m = len(markers)
    last = markers[-1]
    hi = markers_at - last
    lo = max(4, hi - 256 * (KSYM_NAME_LEN + 2) - 8)
    s = hi - ((base_va + hi) % 4)
    while s >= lo:
        found = _num_syms_before(blob, s, base_va, m)
        if found is not None:
            n, num_at = found
            end, cost = _walk_names(blob, s, n, markers_at, markers)
            work.charge(cost + 1)
            if markers_at in (_align4(end, base_va), _align8(end, base_va)):
                yield s, n, num_at, end
        s -= 4


def _text_index(blob: bytes, names: int, n: int, tokens: list[bytes], work: _Work) -> int:
    """The table index of the ``_text`` symbol (usually among the first few thousand:
    the table is in address order and only per-cpu symbols come before the image)."""
    targets = (b"T_text", b"t_text")
    pos = names
    for i in range(n):
        k, pos = _name_len(blob, pos)
        if k <= 6 and b"".join(tokens[c] for c in blob[pos : pos + k]) in targets:
            work.charge(i + 1)
            return i
        pos += k
    work.charge(n)
    raise GuestFormatError(f"kallsyms has no _text symbol among its {n} names")


def _sorted(values: Sequence[int]) -> bool:
    return all(a <= b for a, b in itertools.pairwise(values))


def _check_encoding(
    blob: bytes, off_at: int, n: int, encoding: str, rb: int, base_va: int, tables: Sequence[int]
) -> list[int] | None:
    """The decoded addresses when the entries at ``off_at`` read as ``encoding`` satisfy
    that encoding's invariant (6) and ``_text`` (table index ``tables[0]``) is where
    invariant 7 puts it relative to the tables (VA ``tables[1]``), else None."""
    text_i, tables_va = tables
    if encoding == "absolute":
        vals = list(struct.unpack_from(f"<{n}Q", blob, off_at))
        if not _text_plausible(vals[text_i], tables_va) or not _sorted(vals):
            return None
        return vals
    offs = list(struct.unpack_from(f"<{n}i", blob, off_at))
    if encoding == "relative-percpu":
        if -1 not in offs:  # the base is the lowest relative address: its entry is -1
            return None
    elif encoding == "relative" and offs[0] != 0:
        return None
    text = addresses(offs[text_i : text_i + 1], rb, encoding, base_va + off_at + 4 * text_i)
    if not _text_plausible(text[0], tables_va):
        return None
    addrs = addresses(offs, rb, encoding, base_va + off_at)
    if not _sorted(addrs) or addrs[-1] < KERNEL_HALF:
        return None
    if encoding == "place-relative":
        # Zeros read as place-relative offsets put every symbol on its own entry: sorted
        # and in the kernel half, but no kernel has its symbols inside kallsyms_offsets.
        table_lo, table_hi = base_va + off_at, base_va + off_at + 4 * n
        if all(table_lo <= a < table_hi for a in (addrs[0], addrs[n // 2], addrs[-1])):
            return None
        if addrs[0] < KERNEL_HALF:
            return None
    return addrs


def _text_plausible(text: int, tables_va: int) -> bool:
    """Invariant 7: ``_text`` starts the image, 2 MiB aligned (CONFIG_PHYSICAL_ALIGN on
    x86-64, and KASLR moves it in those steps), below its read-only data and less than
    the 1 GiB image size away from it."""
    return text >= KERNEL_HALF and text % (2 << 20) == 0 and 0 < tables_va - text < 1 << 30


def _find_addresses(
    blob: bytes,
    names: int,
    num_at: int,
    n: int,
    index_at: int,
    base_va: int,
    text_i: int,
    work: _Work,
) -> tuple[int, str, int, int]:
    """(entries position, encoding, relative base value, its position or -1)."""
    after4 = _align4(index_at + 512, base_va)
    cands: list[tuple[int, str, int]] = []  # (position, encoding, rb position or -1)
    # 6.4+: the addresses follow the token index (first: before num_syms there is other
    # read-only data on those kernels, which must not win over the real table).
    for after in dict.fromkeys((after4, _align8(after4, base_va))):
        cands.append((after, "place-relative", -1))
        rb_at = _align8(after + 4 * n, base_va)
        cands.append((after, "relative-percpu", rb_at))
        cands.append((after, "relative", rb_at))
    # Up to 6.3: offsets, relative_base (8-byte aligned), then num_syms; or u64
    # kallsyms_addresses right before num_syms. Not the unsigned "relative" encoding:
    # ABSOLUTE_PERCPU went in 6.15, two years after 6.4 moved the offsets behind the
    # token index, so no kernel has it here. (Trying it made a tiny absolute table
    # ambiguous: u64 entries [0, X] read the same as offsets [0, 0] and a base X.)
    rb_at = num_at - 8
    cands.append((rb_at - _align8(4 * n, 0), "relative-percpu", rb_at))
    cands.append((num_at - 8 * n, "absolute", -1))
    for pos, encoding, rb_pos in cands:
        size = 8 if encoding == "absolute" else 4
        if pos < 0 or pos + size * n > len(blob) or rb_pos + 8 > len(blob):
            continue
        rb = 0
        if rb_pos >= 0:
            rb = int(struct.unpack_from("<Q", blob, rb_pos)[0])
            if rb < KERNEL_HALF:
                continue
        tables = (text_i, base_va + names)
        work.charge(n)
        if _check_encoding(blob, pos, n, encoding, rb, base_va, tables) is not None:
            return pos, encoding, rb, rb_pos
    raise GuestFormatError(
        f"no kallsyms_offsets/kallsyms_addresses for {n} symbols after the token index or "
        "before kallsyms_num_syms decode to sorted kernel addresses"
    )


def find_tables(blob: bytes, base_va: int) -> KallsymsTables:
    """Locate and verify every kallsyms table in ``blob`` (read-only data at ``base_va``).

    On failure the one-line :class:`GuestFormatError` names, for the token table that
    got furthest, which tables were found (and where) and the first one missed."""
    best: tuple[int, str] | None = None
    start = 0
    anchors = 0
    for _ in range(_MAX_ANCHORS):
        anchor = blob.find(ANCHOR, start)
        if anchor < 0:
            break
        anchors += 1
        start = anchor + 1
        progress = _Progress(base_va)
        try:
            return _tables_from_anchor(blob, anchor, base_va, progress)
        except (GuestFormatError, struct.error, IndexError) as e:
            found = "; ".join(progress.found)
            line = (
                f"found {found}; missed: {e}"
                if found
                else f"'0'..'9' token run at {base_va + anchor:#x} is no token table ({e})"
            )
            if best is None or len(progress.found) > best[0]:
                best = (len(progress.found), line)
    if best is None:
        raise GuestFormatError(
            f"kallsyms tables not found: no token table anchor (the '0'..'9' one-character "
            f"token run) in {len(blob)} bytes at {base_va:#x}"
        )
    raise GuestFormatError(
        f"kallsyms tables not found ({anchors} candidate token run(s)): {best[1]}"
    )


def _markers_before_seqs(blob: bytes, table: int, base_va: int) -> Iterator[tuple[int, list[int]]]:
    """Marker arrays followed by ``kallsyms_seqs_of_names`` (3 bytes a symbol), then the
    token table: the layout of some 6.1 builds. Nearest the table first, and lazily: the
    caller stops at the first that checks out, before the rest of the window is read.

    A marker array of m entries at p leaves room for n symbols' seqs before the table,
    and n must be in (256(m-1), 256m]: so each candidate start p (an aligned zero u32,
    the first marker) admits at most three m, all about (table - p) / 772. The markers
    strictly increase from that zero, so they are read only up to the first value that
    does not: such a run ends at the next zero u32 at the latest, runs from different
    starts never overlap, and the whole window costs at most two reads per u32: linear
    whatever the bytes (reading all m values of every candidate was quadratic, and took
    over a minute on the Debian 6.1 .rodata)."""
    lo = max(0, table - 3 * MAX_SYMS - 4 * (MAX_SYMS // 256 + 1) - 16)
    top = table - ((base_va + table) % 8) - 8  # the candidate nearest the table
    if top < lo:
        return
    start = top - 8 * ((top - lo) // 8)  # the lowest candidate (word index 0)
    words = _u32_words(blob, start, (table - start) // 4)
    yielded = 0
    for i in range((top - start) // 4, -1, -2):
        if yielded >= 4:
            return
        if words[i]:
            continue
        p = start + 4 * i
        gap = table - p
        m_lo = max(1, (gap - 8) // 772)  # m_lo entries always fit below the table
        run, last = 1, 0  # the strictly increasing run from p, read as far as needed
        while run < m_lo and (v := words[i + run]) > last:
            run, last = run + 1, v
        if run < m_lo:
            continue  # the common case, cut short before any arithmetic on m
        for m in range(m_lo, (gap + 768) // 772 + 2):
            seqs = _align8(p + 4 * m, base_va)
            rest = table - seqs
            if rest < 0:
                break
            while run < m and (v := words[i + run]) > last:  # m entries fit (rest >= 0)
                run, last = run + 1, v
            if run < m:
                break  # the run has ended: no longer array starts at p either
            n_lo, n_hi = max(1, -(-(rest - 7) // 3)), rest // 3
            if max(n_lo, 256 * (m - 1) + 1) > min(n_hi, 256 * m):
                continue
            yield p, list(words[i : i + m])
            yielded += 1


def _tables_from_anchor(
    blob: bytes, anchor: int, base_va: int, progress: _Progress | None = None
) -> KallsymsTables:
    progress = progress or _Progress(base_va)
    table, index_at, tokens = _check_token_table(blob, anchor, base_va)
    progress.add("kallsyms_token_table", table)
    progress.add("kallsyms_token_index", index_at)

    # Markers end at the token table (u32; unsigned long on older 4.x), or before a
    # kallsyms_seqs_of_names array of 3 bytes per symbol (6.2-6.3).
    def candidates() -> Iterator[tuple[int, list[int], int]]:
        for p, m in _markers_before(blob, table, base_va):
            yield p, m, 4
        for p, m in _markers_before_u64(blob, table, base_va):
            yield p, m, 8
        for p, m in _markers_before_seqs(blob, table, base_va):
            yield p, m, 4

    # Every candidate (markers, then names and num_syms) is verified to the end (_text,
    # the addresses) before it is taken: the first one that only walks can be a wrong
    # one (a zero u32 of kallsyms_seqs_of_names read as one marker, or a names stream
    # walked from inside one of its own entries), and giving up there missed the real
    # table behind it. The error reports the candidate that got furthest.
    work = _Work()
    base_found = list(progress.found)
    best_depth, best_found = 0, base_found
    best_err = "kallsyms_markers (no array increasing from 0 before the token table)"
    tried = 0
    for markers_at, markers, marker_size in candidates():
        tried += 1
        names_err = f"kallsyms_names ({tried} marker candidate(s); last: "
        try:
            for names, n, num_at, names_end in _names_candidates(
                blob, markers_at, markers, base_va, work
            ):
                progress.found = list(base_found)
                progress.add("kallsyms_markers", markers_at, f" ({len(markers)})")
                progress.add("kallsyms_num_syms", num_at, f" ({n})")
                progress.add("kallsyms_names", names)
                depth = 2
                try:
                    text_i = _text_index(blob, names, n, tokens, work)
                    depth = 3
                    off_at, encoding, rb, rb_at = _find_addresses(
                        blob, names, num_at, n, index_at, base_va, text_i, work
                    )
                except _WorkExceeded:
                    raise
                except GuestFormatError as e:
                    if depth > best_depth:
                        best_depth, best_found, best_err = depth, progress.found, str(e)
                    continue
                return KallsymsTables(
                    base_va=base_va,
                    num_syms=n,
                    names=names,
                    markers=markers_at,
                    num_markers=len(markers),
                    token_table=table,
                    token_index=index_at,
                    offsets=off_at,
                    relative_base=rb,
                    relative_base_at=rb_at,
                    names_end=names_end,
                    encoding=encoding,
                    num_syms_at=num_at,
                    marker_size=marker_size,
                )
        except _WorkExceeded as e:
            progress.found = best_found
            raise GuestFormatError(f"{e} after {tried} marker candidate(s)") from None
        if best_depth <= 1:  # no names for any markers so far: report the latest
            best_depth = 1
            best_err = (
                f"{names_err}no kallsyms_names stream (with kallsyms_num_syms before it) "
                f"agrees with the {len(markers)} markers)"
            )
    progress.found = best_found
    raise GuestFormatError(best_err)


@dataclass(frozen=True)
class TokenLocation:
    """Where the token table and index sit in the blob: the cheap first step, enough
    to key the per-build cache before anything else is decoded."""

    token_table: int
    token_index: int


def locate_token_table(blob: bytes, base_va: int) -> TokenLocation | None:
    """The verified token table/index of ``blob``, or None if it has none."""
    start = 0
    for _ in range(_MAX_ANCHORS):
        anchor = blob.find(ANCHOR, start)
        if anchor < 0:
            return None
        start = anchor + 1
        try:
            table, index_at, _ = _check_token_table(blob, anchor, base_va)
        except (GuestFormatError, struct.error, IndexError):
            continue
        return TokenLocation(table, index_at)
    return None


@dataclass(frozen=True)
class Decoded:
    """The symbol table as parallel arrays (cheap to build, cache and look up)."""

    names: list[str]
    types: str
    offsets: list[int]  # raw entries: s32 (u64 for the absolute encoding)


def decode(blob: bytes, t: KallsymsTables) -> Decoded:
    """Every symbol of the table, in table order (address order, as /proc/kallsyms)."""
    index = struct.unpack_from("<256H", blob, t.token_index)
    tokens = []
    for i in range(256):
        end = blob.index(b"\0", t.token_table + index[i])
        tokens.append(blob[t.token_table + index[i] : end].decode("latin-1"))
    code = "Q" if t.encoding == "absolute" else "i"
    offsets = list(struct.unpack_from(f"<{t.num_syms}{code}", blob, t.offsets))
    names = []
    types = []
    pos = t.names
    get = tokens.__getitem__
    for i in range(t.num_syms):
        n, pos = _name_len(blob, pos)
        text = "".join(map(get, blob[pos : pos + n]))
        pos += n
        if len(text) < 2 or not (text.isascii() and text.isprintable()) or " " in text:
            raise GuestFormatError(f"kallsyms symbol {i} has a malformed name {text[:40]!r}")
        types.append(text[0])
        names.append(text[1:])
    return Decoded(names, "".join(types), offsets)


def addresses(
    offsets: Sequence[int],
    relative_base: int,
    encoding: str = "relative-percpu",
    offsets_va: int = 0,
) -> list[int]:
    """Symbol addresses from the raw entries the way ``kallsyms_sym_address`` computes
    them for each encoding (see invariant 6 of the module docstring). ``offsets_va`` is
    where the entries sit in the guest (only the place-relative encoding needs it)."""
    rb = relative_base
    if encoding == "relative-percpu":
        return _wrap64([off if off >= 0 else rb - 1 - off for off in offsets])
    if encoding == "relative":
        return _wrap64([rb + (off & 0xFFFFFFFF) for off in offsets])
    if encoding == "place-relative":
        # map/range keep the 200k additions in C: a cached 7.3 attach does this each time
        return _wrap64(
            list(map(operator.add, offsets, range(offsets_va, offsets_va + 4 * len(offsets), 4)))
        )
    if encoding == "absolute":
        return list(offsets)
    raise ValueError(f"unknown kallsyms encoding {encoding!r}")


def _wrap64(out: list[int]) -> list[int]:
    """``out`` modulo 2**64, as the kernel's ``unsigned long`` arithmetic has it. Only
    forged or misread tables wrap, and then their addresses stop being sorted, which is
    what rejects them: a base near the top plus a large offset must not decode to an
    address above the 64-bit space (it did, and a tiny table then passed as sorted)."""
    if out and (min(out) < 0 or max(out) > _MASK64):
        return [a & _MASK64 for a in out]
    return out
