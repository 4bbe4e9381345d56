"""Decode the kernel's own symbol table (kallsyms) from raw bytes of its read-only data.

Why by structure: stock distribution kernels ship no System.map, and the vmcoreinfo note
that names the tables on 6.x kernels is missing on 5.10 and forgeable everywhere. The
tables ``scripts/kallsyms.c`` generates have a shape we can recognise instead:

- ``kallsyms_token_table``: 256 NUL-terminated tokens; every byte value that occurs in
  symbol names keeps its own one-character token, so ``"0\\0" "1\\0" ... "9\\0"`` sits at
  token 0x30. That run is the anchor.
- ``kallsyms_token_index``: 256 u16 offsets into the token table, right after it.
- ``kallsyms_markers``: u32 offsets into the names of every 256th symbol, right before
  the token table; ``kallsyms_names`` before them, ``kallsyms_num_syms`` before those.
- ``kallsyms_offsets`` + ``kallsyms_relative_base``: either before ``num_syms`` (5.10)
  or after the token index (6.x); both placements are tried and checked.

Every candidate is verified end to end (markers agree with the decoded name stream,
which ends exactly where the markers begin), so forged or corrupt tables give a
:class:`GuestFormatError`, never a wrong table. Pure: bytes in, symbols out.
"""

from __future__ import annotations

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
    relative_base: int  # value, not position
    relative_base_at: int
    names_end: int

    def va(self, off: int) -> int:
        return self.base_va + off

    def span(self) -> tuple[int, int]:
        """Blob offsets ``[lo, hi)`` covering every table (for hashing the build)."""
        lo = min(self.offsets, self.names - 8)
        hi = max(self.token_index + 512, self.relative_base_at + 8)
        return lo, hi


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


def _check_token_table(blob: bytes, anchor: int, base_va: int) -> tuple[int, int, list[bytes]]:
    """Given the ``"0\\0..9\\0"`` run at ``anchor``: (token_table, token_index, tokens)."""
    _, tail_end = _tokens_at(blob, anchor, 256 - 0x30, 256)
    index_at = _align8(tail_end, base_va)
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
    return table, index_at, tokens


def _markers_before(blob: bytes, table: int, base_va: int) -> list[tuple[int, list[int]]]:
    """Candidate marker arrays ending at ``table`` (maybe padded): (start, markers)."""
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
                if (base_va + pos) % 8 == 0:
                    found.append((pos, vals[::-1]))
                break
            pos -= 4
    return found


def _name_len(blob: bytes, pos: int) -> tuple[int, int]:
    n = blob[pos]
    if n & 0x80:  # 6.1+: big symbol names, two-byte ULEB128 length
        return (n & 0x7F) | (blob[pos + 1] << 7), pos + 2
    return n, pos + 1


def _walk_names(blob: bytes, start: int, count: int, stop: int) -> list[int]:
    """Offsets of each of ``count`` length-prefixed entries from ``start``; end last."""
    offs = []
    pos = start
    for _ in range(count):
        if pos >= stop:
            raise GuestFormatError("kallsyms names run past their end")
        offs.append(pos)
        n, pos = _name_len(blob, pos)
        if n == 0 or n > KSYM_NAME_LEN:
            raise GuestFormatError(f"kallsyms name at {pos:#x} has length {n}")
        pos += n
    offs.append(pos)
    return offs


def _find_names(
    blob: bytes, markers_at: int, markers: list[int], base_va: int
) -> tuple[int, int, list[int]]:
    """(names start, num_syms, entry offsets) consistent with the markers."""
    m = len(markers)
    last = markers[-1]
    hi = markers_at - last
    lo = max(8, hi - 256 * (KSYM_NAME_LEN + 2) - 8)
    s = hi - ((base_va + hi) % 8)
    walked = 0  # entries decoded over all candidates: forged data must not go quadratic
    while s >= lo:
        n = _u32(blob, s - 8)
        if 256 * (m - 1) < n <= 256 * m and _u32(blob, s - 4) == 0:
            walked += n
            if walked > 4 * MAX_SYMS:
                raise GuestFormatError("kallsyms_names search exceeded its work bound")
            try:
                offs = _walk_names(blob, s, n, markers_at)
            except (GuestFormatError, IndexError):
                s -= 8
                continue
            end = offs[-1]
            if markers_at - 8 < end <= markers_at and all(
                offs[256 * k] - s == markers[k] for k in range(m)
            ):
                return s, n, offs
        s -= 8
    raise GuestFormatError("no kallsyms_names stream agrees with kallsyms_markers")


def _offsets_candidates(
    blob: bytes, names: int, n: int, index_at: int, base_va: int
) -> list[tuple[int, int]]:
    """(offsets position, relative_base position) pairs, both layouts."""
    size = _align8(4 * n, 0)
    # 6.x first: there the bytes before num_syms are not offsets, and a forged kernel
    # pointer in them must not win over the real table after the token index.
    after = _align8(index_at + 512, base_va)  # 6.x: ..., token_index, offsets, relative_base
    rb_before = names - 16  # 5.10: offsets, relative_base, num_syms, names
    cands = [(after, after + size), (rb_before - size, rb_before)]
    return [(o, r) for o, r in cands if o >= 0 and r + 8 <= len(blob)]


def find_tables(blob: bytes, base_va: int) -> KallsymsTables:
    """Locate and verify every kallsyms table in ``blob`` (read-only data at ``base_va``)."""
    errors: list[str] = []
    start = 0
    for _ in range(_MAX_ANCHORS):
        anchor = blob.find(ANCHOR, start)
        if anchor < 0:
            break
        start = anchor + 1
        try:
            return _tables_from_anchor(blob, anchor, base_va)
        except (GuestFormatError, struct.error, IndexError) as e:
            errors.append(f"{base_va + anchor:#x}: {e}")
    why = "; ".join(errors[:4]) or "no token table anchor"
    raise GuestFormatError(f"kallsyms tables not found ({why})")


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


def _offsets_plausible(blob: bytes, off_at: int, n: int) -> bool:
    """kallsyms_offsets of an x86-64 kernel: most entries relative (negative), and the
    symbol at the relative base itself (_text) encoded as -1."""
    offs = struct.unpack_from(f"<{n}i", blob, off_at)
    negative = sum(1 for o in offs if o < 0)
    return negative * 2 >= n and -1 in offs


def _tables_from_anchor(blob: bytes, anchor: int, base_va: int) -> KallsymsTables:
    table, index_at, _tokens = _check_token_table(blob, anchor, base_va)

    # Markers end at the token table (5.10, 6.12), or before a kallsyms_seqs_of_names
    # array of 3 bytes per symbol (some 6.1 builds).
    def candidates() -> Iterator[tuple[int, list[int]]]:
        yield from _markers_before(blob, table, base_va)
        yield from _markers_before_seqs(blob, table, base_va)

    last_err = "no marker array before the token table"
    for markers_at, markers in candidates():
        try:
            names, n, offs = _find_names(blob, markers_at, markers, base_va)
        except GuestFormatError as e:
            last_err = str(e)
            continue
        for off_at, rb_at in _offsets_candidates(blob, names, n, index_at, base_va):
            rb = struct.unpack_from("<Q", blob, rb_at)[0]
            if rb >> 47 != 0x1FFFF:  # must be a kernel (upper half) address
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
                names_end=offs[-1],
            )
        last_err = "no kallsyms_offsets/relative_base next to the names"
    raise GuestFormatError(last_err)


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
    offsets: list[int]  # raw kallsyms_offsets values


def decode(blob: bytes, t: KallsymsTables) -> Decoded:
    """Every symbol of the table, in table order (address order, as /proc/kallsyms)."""
    index = struct.unpack_from("<256H", blob, t.token_index)
    tokens = []
    for i in range(256):
        end = blob.index(b"\0", t.token_table + index[i])
        tokens.append(blob[t.token_table + index[i] : end].decode("latin-1"))
    offsets = list(struct.unpack_from(f"<{t.num_syms}i", blob, t.offsets))
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


def addresses(offsets: list[int], relative_base: int, absolute_percpu: bool = True) -> list[int]:
    """Symbol addresses from ``kallsyms_offsets`` the way ``kallsyms_sym_address`` does:
    with ABSOLUTE_PERCPU (x86-64 SMP) non-negative values are absolute (per-cpu offsets)
    and negative ones count down from the relative base."""
    rb = relative_base
    if absolute_percpu:
        return [off if off >= 0 else rb - 1 - off for off in offsets]
    return [rb + (off & 0xFFFFFFFF) for off in offsets]
