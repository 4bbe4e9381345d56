"""Kernel symbols as one record type, whatever table they came from.

/proc/kallsyms, System.map, a Volatility ISF and the kallsyms tables vmshield reads out of
guest memory all describe the same thing: a name, an address, an nm-style type letter and,
for module symbols, the module. Keeping a single frozen record lets every consumer (the
symbol resolver, the CLI, the tests comparing one source against another) ignore where a
symbol came from.

A :class:`Symbol` checks itself on construction: a name with a newline or a 10 kB name
would otherwise flow into terminals, log lines and the kallsyms text we print back, and
would make ``format_kallsyms_line`` emit something that does not parse again.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from vmshield.errors import GuestFormatError

KSYM_NAME_LEN = 512
"""The kernel's ``KSYM_NAME_LEN`` (6.1+): the buffer size, terminating NUL included."""

MAX_SYMBOL_NAME = KSYM_NAME_LEN - 1
"""Longest symbol name the kernel can hold (``scripts/kallsyms`` drops anything longer)."""

MODULE_NAME_LEN = 56
"""The kernel's ``MODULE_NAME_LEN`` on 64-bit (``64 - sizeof(unsigned long)``), NUL included."""

MAX_MODULE_NAME = MODULE_NAME_LEN - 1

MAX_ADDRESS = (1 << 64) - 1

UNKNOWN_TYPE = "?"
"""The type letter used when the source does not say (nm prints ``?`` for the same reason)."""


# Fast whole-field checks for the common, valid case; symbol_problem explains failures.
_NAME_RE = re.compile(rf"[!-~]{{1,{MAX_SYMBOL_NAME}}}")
_TYPE_RE = re.compile(r"[!-~]")
_MODULE_RE = re.compile(rf"[!-Z\\^-~]{{1,{MAX_MODULE_NAME}}}")  # printable, no [ ] or space


def _is_plain(text: str) -> bool:
    """True when every character is printable ASCII other than space.

    Kernel symbol names (C identifiers, ``foo.cold``, ``__func__.1``, Rust v0 mangling) are
    all in this set; anything else is forged or corrupt and could hide control characters
    that act on the terminal the name is later printed to.
    """
    return text.isascii() and text.isprintable() and " " not in text


def symbol_problem(name: str, address: int, type: str, module: str | None) -> str | None:
    """Say what is wrong with these symbol fields, or ``None`` when they are valid.

    Exposed (rather than only raising from :class:`Symbol`) so parsers can prefix the
    message with the file and line the bad value came from.
    """
    if not isinstance(name, str):
        return f"symbol name {name!r} is not a string"
    if not name:
        return "empty symbol name"
    if len(name) > MAX_SYMBOL_NAME:
        return (
            f"symbol name of {len(name)} characters is longer than the kernel's limit "
            f"of {MAX_SYMBOL_NAME} (KSYM_NAME_LEN {KSYM_NAME_LEN})"
        )
    if not _is_plain(name):
        return f"symbol name {name[:64]!r} has whitespace, control or non-ASCII characters"
    if isinstance(address, bool) or not isinstance(address, int):
        return f"symbol {name!r}: address {address!r} is not an integer"
    if not 0 <= address <= MAX_ADDRESS:
        return f"symbol {name!r}: address {address:#x} does not fit in 64 bits"
    if not isinstance(type, str) or len(type) != 1 or not _is_plain(type):
        return f"symbol {name!r}: type {type[:16]!r} is not one printable character"
    if module is not None:
        if not isinstance(module, str):
            return f"symbol {name!r}: module {module!r} is not a string"
        if not module:
            return f"symbol {name!r}: empty module name"
        if len(module) > MAX_MODULE_NAME:
            return (
                f"symbol {name!r}: module name of {len(module)} characters is longer than "
                f"the kernel's limit of {MAX_MODULE_NAME}"
            )
        if not _is_plain(module) or "[" in module or "]" in module:
            return f"symbol {name!r}: module name {module[:64]!r} has invalid characters"
    return None


@dataclass(frozen=True, slots=True)
class Symbol:
    """One kernel symbol.

    ``type`` is the one-letter nm type exactly as /proc/kallsyms shows it (upper case for
    global, lower case for local; for module symbols upper case means exported), or
    :data:`UNKNOWN_TYPE` when the source has no type. ``module`` is the ``[modname]``
    column of /proc/kallsyms, ``None`` for the core kernel.

    Raises :class:`GuestFormatError` when a field is invalid, since invalid symbols only
    ever come from data read from outside.
    """

    name: str
    address: int
    type: str
    module: str | None = None

    def __post_init__(self) -> None:
        address = self.address
        if (
            type(self.name) is str
            and _NAME_RE.fullmatch(self.name)
            and type(address) is int
            and 0 <= address <= MAX_ADDRESS
            and type(self.type) is str
            and _TYPE_RE.fullmatch(self.type)
            and (
                self.module is None
                or (type(self.module) is str and _MODULE_RE.fullmatch(self.module))
            )
        ):
            return
        problem = symbol_problem(self.name, self.address, self.type, self.module)
        raise GuestFormatError(problem or f"invalid symbol {self.name!r}")


def format_kallsyms_line(sym: Symbol) -> str:
    """The line /proc/kallsyms shows for ``sym``, without the trailing newline.

    Same format as the kernel's ``s_show``: ``%px %c %s`` (``%px`` is 16 zero-padded lower
    case hex digits on 64-bit), followed by ``\\t[module]`` for module symbols. Used to
    write symbol tables other tools (and our own parser) read back unchanged.
    """
    line = f"{sym.address:016x} {sym.type} {sym.name}"
    if sym.module is not None:
        line += f"\t[{sym.module}]"
    return line


def addresses_hidden(symbols: Sequence[Symbol]) -> bool:
    """True when the table is non-empty and every address is zero.

    That is what /proc/kallsyms shows to a reader the kernel's ``kptr_restrict`` policy
    hides pointers from: the names are still useful, the addresses are not, and callers
    must not resolve anything against them. An empty table hides nothing.
    """
    return bool(symbols) and all(sym.address == 0 for sym in symbols)
