"""Importers for kernel symbol tables a user may already have on disk.

vmshield normally finds symbols in guest memory, but a user often already holds a table
for the guest kernel: a copy of the guest's /proc/kallsyms, the System.map shipped next to
the kernel, or a Volatility 3 ISF built with dwarf2json. Each importer here turns one of
those into the same list of :class:`~vmshield.guest.symbols.Symbol`, so the rest of
vmshield does not care where a table came from.

These files come from outside (possibly from the guest itself) and are treated as hostile:
every importer either returns a list or raises :class:`GuestFormatError` naming the file,
the line (or JSON path / byte offset) and the problem. Memory stays in the input's own size
class: text is scanned line by line without building a list of lines, overlong lines are
refused before they are copied, and compressed ISF files are decompressed under a hard
output limit so a small ``.xz`` cannot expand into gigabytes.
"""

from __future__ import annotations

import bz2
import json
import lzma
import re
import zlib
from collections.abc import Iterator, Mapping
from typing import Any, TypeGuard

from vmshield.errors import GuestFormatError
from vmshield.guest.symbols import (
    MAX_MODULE_NAME,
    MAX_SYMBOL_NAME,
    UNKNOWN_TYPE,
    Symbol,
    addresses_hidden,
    format_kallsyms_line,
)

__all__ = [
    "MAX_ISF_SIZE",
    "MAX_LINE_LENGTH",
    "Symbol",
    "addresses_hidden",
    "format_kallsyms_line",
    "isf_struct_offsets",
    "load_isf",
    "parse_proc_kallsyms",
    "parse_system_map",
    "parse_volatility_isf",
]

MAX_LINE_LENGTH = 16 + 1 + 1 + 1 + MAX_SYMBOL_NAME + 3 + MAX_MODULE_NAME + 64
"""Longest line accepted: a full kallsyms line at the kernel's name limits plus slack for
extra blanks. Anything longer cannot be a valid line, so it is refused before it is copied."""

MAX_ISF_SIZE = 256 * 1024 * 1024
"""Largest ISF JSON text accepted (after decompression). Real Linux ISFs are tens of MiB;
the cap keeps a decompression bomb or a runaway file from exhausting the host's memory."""

MAX_STRUCT_OFFSET = (1 << 32) - 1
"""Member offsets beyond 4 GiB cannot belong to a real kernel structure."""

_XZ_MAGIC = b"\xfd7zXZ\x00"
_GZIP_MAGIC = b"\x1f\x8b"
_BZIP2_MAGIC = b"BZh"
_XZ_MEMLIMIT = 512 * 1024 * 1024
_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")
# The exact shape the kernel and nm print; lines that do not match take the slow path,
# which accepts other blank runs and explains what is wrong.
_KALLSYMS_LINE = re.compile(r"([0-9a-fA-F]{1,16}) (\S) (\S+)(?:\t\[(\S+)\])?")
_SYSTEM_MAP_LINE = re.compile(r"([0-9a-fA-F]{1,16}) (\S) (\S+)")


def _shorten(text: str, limit: int = 80) -> str:
    """``repr`` of at most ``limit`` characters of ``text``, for error messages."""
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _iter_lines(text: str, source: str) -> Iterator[tuple[int, str]]:
    """Yield ``(line number, line)`` pairs of ``text`` without materialising all lines.

    Only ``\\n`` ends a line (``str.splitlines`` would also split on form feeds and other
    separators a forged file can contain, shifting the line numbers we report); a trailing
    ``\\r`` is dropped so files that went through a CRLF tool still parse.
    """
    pos = 0
    end_of_text = len(text)
    lineno = 0
    while pos < end_of_text:
        lineno += 1
        # Look for the newline only within the longest acceptable line (+ "\r\n").
        window_end = min(end_of_text, pos + MAX_LINE_LENGTH + 2)
        newline = text.find("\n", pos, window_end)
        if newline == -1:
            if window_end < end_of_text:
                raise GuestFormatError(
                    f"{source}: line {lineno}: longer than {MAX_LINE_LENGTH} characters"
                )
            newline = end_of_text
        line = text[pos:newline]
        if line.endswith("\r"):
            line = line[:-1]
        if len(line) > MAX_LINE_LENGTH:
            raise GuestFormatError(
                f"{source}: line {lineno}: longer than {MAX_LINE_LENGTH} characters"
            )
        yield lineno, line
        pos = newline + 1


def _parse_address(field: str, source: str, lineno: int) -> int:
    """Parse the hex address column strictly.

    ``int(x, 16)`` alone would also accept ``0x``, ``+``, ``_`` separators and surrounding
    blanks, none of which the kernel or nm ever print.
    """
    if not 1 <= len(field) <= 16 or not _HEX_DIGITS.issuperset(field):
        raise GuestFormatError(
            f"{source}: line {lineno}: address {_shorten(field, 32)} is not 1 to 16 hex digits"
        )
    return int(field, 16)


def _parse_table(text: str, source: str, *, allow_module: bool) -> list[Symbol]:
    """Shared parser of the ``address type name [\\t[module]]`` line format."""
    if not isinstance(text, str):
        raise GuestFormatError(f"{source}: expected text, got {type(text).__name__}")
    fast = _KALLSYMS_LINE if allow_module else _SYSTEM_MAP_LINE
    symbols: list[Symbol] = []
    for lineno, line in _iter_lines(text, source):
        match = fast.fullmatch(line)
        if match is not None:
            try:
                symbols.append(
                    Symbol(
                        match[3], int(match[1], 16), match[2], match[4] if allow_module else None
                    )
                )
            except GuestFormatError as exc:
                raise GuestFormatError(f"{source}: line {lineno}: {exc}") from None
            continue
        fields = line.split()
        if not fields:
            continue  # blank lines (and the empty tail after the final newline)
        module: str | None = None
        if len(fields) == 4 and allow_module:
            column = fields[3]
            if len(column) < 3 or column[0] != "[" or column[-1] != "]":
                raise GuestFormatError(
                    f"{source}: line {lineno}: fourth column {_shorten(column, 40)} is not "
                    "a [module] name"
                )
            module = column[1:-1]
        elif len(fields) != 3:
            expected = "3 or 4" if allow_module else "3"
            raise GuestFormatError(
                f"{source}: line {lineno}: {len(fields)} columns, expected {expected} "
                f"(address type name): {_shorten(line)}"
            )
        address = _parse_address(fields[0], source, lineno)
        try:
            symbols.append(Symbol(fields[2], address, fields[1], module))
        except GuestFormatError as exc:
            raise GuestFormatError(f"{source}: line {lineno}: {exc}") from None
    return symbols


def parse_proc_kallsyms(text: str, *, source: str = "/proc/kallsyms") -> list[Symbol]:
    """Parse the text of /proc/kallsyms (as ``cat /proc/kallsyms`` prints it).

    Lines are ``ffffffff81000000 T _text``, module symbols add ``\\t[modname]``. When the
    kernel's ``kptr_restrict`` hid the addresses they are all zero: they are kept as read
    (the names are still useful) and :func:`addresses_hidden` tells the caller not to trust
    them. ``source`` names the file in error messages.
    """
    return _parse_table(text, source, allow_module=True)


def parse_system_map(text: str, *, source: str = "System.map") -> list[Symbol]:
    """Parse a System.map (``nm -n vmlinux`` output the kernel build installs in /boot).

    Same three columns as /proc/kallsyms but never a module column, so a fourth column is
    an error here: it means the file is something else.
    """
    return _parse_table(text, source, allow_module=False)


def _decompress(data: bytes, kind: str, source: str, max_size: int) -> bytes:
    """Decompress a whole xz/gzip/bzip2 stream, refusing output above ``max_size``.

    The ``max_length`` argument of the standard decompressors is what bounds memory: the
    decompressor stops once it has produced one byte more than the limit allows.
    """
    decompressor: Any
    if kind == "xz":
        decompressor = lzma.LZMADecompressor(format=lzma.FORMAT_XZ, memlimit=_XZ_MEMLIMIT)
    elif kind == "gzip":
        decompressor = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    else:
        decompressor = bz2.BZ2Decompressor()
    try:
        out: bytes = decompressor.decompress(data, max_size + 1)
    except (lzma.LZMAError, zlib.error, OSError, EOFError, ValueError) as exc:
        raise GuestFormatError(f"{source}: corrupt {kind} data: {exc}") from None
    if len(out) > max_size:
        raise GuestFormatError(
            f"{source}: decompresses to more than {max_size} bytes (the ISF size limit)"
        )
    if not decompressor.eof:
        raise GuestFormatError(f"{source}: {kind} data is truncated")
    if decompressor.unused_data:
        offset = len(data) - len(decompressor.unused_data)
        raise GuestFormatError(
            f"{source}: trailing data after the {kind} stream at offset {offset}"
        )
    return out


def load_isf(
    data: bytes | str, *, source: str = "ISF", max_size: int = MAX_ISF_SIZE
) -> dict[str, Any]:
    """Decode a Volatility 3 ISF (JSON, optionally xz/gzip/bzip2 compressed) into a dict.

    Exposed so a caller wanting both the symbols and the struct layouts decodes the file
    once and passes the result to :func:`parse_volatility_isf` and
    :func:`isf_struct_offsets`. Raises :class:`GuestFormatError` for anything that is not
    a size-bounded JSON object.
    """
    if isinstance(data, str):
        if len(data) > max_size:
            raise GuestFormatError(f"{source}: larger than {max_size} characters")
        text = data
    elif isinstance(data, bytes | bytearray | memoryview):
        raw = bytes(data)
        if raw.startswith(_XZ_MAGIC):
            raw = _decompress(raw, "xz", source, max_size)
        elif raw.startswith(_GZIP_MAGIC):
            raw = _decompress(raw, "gzip", source, max_size)
        elif raw.startswith(_BZIP2_MAGIC):
            raw = _decompress(raw, "bzip2", source, max_size)
        elif len(raw) > max_size:
            raise GuestFormatError(f"{source}: larger than {max_size} bytes")
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise GuestFormatError(
                f"{source}: not UTF-8 at byte offset {exc.start} (of the decompressed JSON)"
            ) from None
    else:
        raise GuestFormatError(f"{source}: expected bytes or text, got {type(data).__name__}")
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise GuestFormatError(
            f"{source}: invalid JSON at line {exc.lineno} column {exc.colno} "
            f"(offset {exc.pos}): {exc.msg}"
        ) from None
    except RecursionError:
        raise GuestFormatError(f"{source}: JSON nested too deeply") from None
    except ValueError as exc:  # e.g. integers beyond Python's digit limit
        raise GuestFormatError(f"{source}: invalid JSON value: {exc}") from None
    if not isinstance(doc, dict):
        raise GuestFormatError(
            f"{source}: top level is a JSON {type(doc).__name__}, expected an object"
        )
    return doc


def _isf_doc(
    data: bytes | str | Mapping[str, Any], source: str, max_size: int
) -> Mapping[str, Any]:
    """Accept either raw ISF data or a document :func:`load_isf` already decoded."""
    if isinstance(data, Mapping):
        return data
    return load_isf(data, source=source, max_size=max_size)


def _section(doc: Mapping[str, Any], key: str, source: str) -> Mapping[str, Any]:
    """The top-level ISF object ``key`` (``symbols``, ``user_types``), which must exist."""
    value = doc.get(key)
    if not isinstance(value, Mapping):
        what = "missing" if value is None else f"a {type(value).__name__}, not an object"
        raise GuestFormatError(f"{source}: {key!r} is {what}")
    return value


def _is_int(value: object) -> TypeGuard[int]:
    """A JSON integer (``bool`` is an ``int`` subclass in Python; JSON true is not a number)."""
    return isinstance(value, int) and not isinstance(value, bool)


def parse_volatility_isf(
    data: bytes | str | Mapping[str, Any],
    *,
    source: str = "ISF",
    max_size: int = MAX_ISF_SIZE,
) -> list[Symbol]:
    """The symbols of a Volatility 3 ISF, in the file's order.

    ``symbols`` maps a name to ``{"address": int, "type": {...}, ...}``. The ISF ``type``
    is a C type descriptor, not an nm letter, and says nothing about global vs. local or
    text vs. data, so every symbol gets :data:`~vmshield.guest.symbols.UNKNOWN_TYPE`.
    """
    doc = _isf_doc(data, source, max_size)
    symbols: list[Symbol] = []
    for name, entry in _section(doc, "symbols", source).items():
        where = f"{source}: symbols[{_shorten(str(name), 60)}]"
        if not isinstance(entry, Mapping):
            raise GuestFormatError(f"{where}: is a {type(entry).__name__}, not an object")
        address = entry.get("address")
        if not _is_int(address):
            raise GuestFormatError(f"{where}: 'address' is missing or not an integer")
        try:
            symbols.append(Symbol(name, address, UNKNOWN_TYPE))
        except GuestFormatError as exc:
            raise GuestFormatError(f"{where}: {exc}") from None
    return symbols


def _check_type_name(name: str, where: str) -> None:
    """Bound a struct or member name: printable (spaces allowed) and not absurdly long."""
    if not name or len(name) > MAX_SYMBOL_NAME or not name.isprintable():
        raise GuestFormatError(f"{where}: invalid name {_shorten(name, 60)}")


def isf_struct_offsets(
    data: bytes | str | Mapping[str, Any],
    *,
    source: str = "ISF",
    max_size: int = MAX_ISF_SIZE,
) -> dict[str, dict[str, int]]:
    """Struct layouts from an ISF's ``user_types``: type name -> member name -> byte offset.

    Lets an ISF stand in for BTF when the guest kernel has none (or for cross-checking
    offsets vmshield derived itself). Unions and classes are included the same way;
    bit-field members report the offset of their storage unit, as the ISF does.
    """
    doc = _isf_doc(data, source, max_size)
    layouts: dict[str, dict[str, int]] = {}
    for type_name, entry in _section(doc, "user_types", source).items():
        where = f"{source}: user_types[{_shorten(str(type_name), 60)}]"
        _check_type_name(type_name, where)
        if not isinstance(entry, Mapping):
            raise GuestFormatError(f"{where}: is a {type(entry).__name__}, not an object")
        fields = entry.get("fields")
        if not isinstance(fields, Mapping):
            raise GuestFormatError(f"{where}: 'fields' is missing or not an object")
        members: dict[str, int] = {}
        for member, info in fields.items():
            member_where = f"{where}.fields[{_shorten(str(member), 60)}]"
            _check_type_name(member, member_where)
            if not isinstance(info, Mapping):
                raise GuestFormatError(f"{member_where}: is a {type(info).__name__}, not an object")
            offset = info.get("offset")
            if not _is_int(offset) or not 0 <= offset <= MAX_STRUCT_OFFSET:
                raise GuestFormatError(
                    f"{member_where}: 'offset' is missing or not an integer in "
                    f"0..{MAX_STRUCT_OFFSET}"
                )
            members[member] = offset
        layouts[type_name] = members
    return layouts
