"""Symbols from outside the guest: ``--symbols FILE`` (a System.map, a copy of
``/proc/kallsyms`` or a Volatility 3 ISF), rebased and checked against guest memory.

Why: when kallsyms cannot be found by structure (a kernel layout nobody has seen yet), or
when the user prefers a table they trust, the symbol table library can come from a file.
Such a file is untrusted like guest memory: it may be for another build, another boot,
or forged. So it is only used after guest memory agrees with it:

- **rebase**: the file's ``_text`` is moved onto ``_text`` found from the page tables
  (the KASLR slide; 0 for a /proc/kallsyms copy of this boot). Only addresses of the
  kernel image mapping move; per-cpu offsets (5.10-6.14) stay as they are. The slide
  must be a multiple of 2 MiB, the step KASLR moves the image in on x86-64;
- ``linux_banner`` at its rebased address must read "Linux version";
- **function prologues**: the functions vmshield places points on must start, at their
  rebased addresses, with the ftrace site every traceable function has (an optional
  ``endbr64`` or sealed endbr, then a 5-byte NOP or ``call``): a table of another build
  puts them in the middle of other code, where this 9-byte shape does not occur;
- every text symbol must lie in the image mapping.

A mismatch is one :class:`GuestFormatError` line naming the file and what disagreed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from vmshield.errors import GuestFormatError
from vmshield.guest.symbols import Symbol, addresses_hidden
from vmshield.guest.symfiles import load_isf, parse_proc_kallsyms, parse_volatility_isf
from vmshield.paths import read_input

KERNEL_MAP_START = 0xFFFF_FFFF_8000_0000
KERNEL_MAP_END = 0xFFFF_FFFF_C000_0000
KASLR_ALIGN = 2 << 20
MAX_FILE = 512 << 20

PROLOGUE_CHECKS = (
    "security_file_open",
    "commit_creds",
    "do_exit",
    "wake_up_new_task",
    "bprm_execve",
    "security_socket_connect",
    "security_path_unlink",
    "security_bpf",
    "__x64_sys_getpid",
    "do_init_module",
)
"""Traceable functions of every kernel the project knows (most are catalog points)."""
MIN_PROLOGUES = 3

_ENDBR = bytes.fromhex("f30f1efa")
_NOP5 = (bytes.fromhex("0f1f440000"), bytes.fromhex("6666666690"))


@dataclass(frozen=True)
class SymbolFile:
    """A parsed symbol file, before it is matched to a guest."""

    path: Path
    kind: str  # "System.map / kallsyms text" or "Volatility 3 ISF"
    symbols: list[Symbol]
    sha256: str


def load_symbol_file(path: Path) -> SymbolFile:
    """Read and parse ``path`` (format detected from its content); module symbols of a
    /proc/kallsyms copy are dropped (modules are found in guest memory)."""
    source = str(path)
    raw = read_input(path, MAX_FILE, f"--symbols {source}", f"larger than {MAX_FILE >> 20} MiB")
    digest = hashlib.sha256(raw).hexdigest()
    if raw.lstrip()[:1] == b"{" or raw[:2] == b"\x1f\x8b" or raw[:3] in (b"BZh", b"\xfd7z"):
        syms = parse_volatility_isf(load_isf(raw, source=source), source=source)
        kind = "Volatility 3 ISF"
    else:
        try:
            text = raw.decode("ascii")
        except UnicodeDecodeError as e:
            raise GuestFormatError(
                f"--symbols {source}: not a System.map, /proc/kallsyms text or ISF "
                f"(non-ASCII byte at offset {e.start})"
            ) from None
        syms = [s for s in parse_proc_kallsyms(text, source=source) if s.module is None]
        kind = "System.map / kallsyms text"
    if not syms:
        raise GuestFormatError(f"--symbols {source}: no kernel symbols in it")
    if addresses_hidden(syms):
        raise GuestFormatError(
            f"--symbols {source}: every address is 0 (kptr_restrict hid them): copy "
            "/proc/kallsyms as root with kernel.kptr_restrict=1 or 0"
        )
    return SymbolFile(path, kind, syms, digest)


def slide_of(f: SymbolFile, text: int) -> int:
    """The slide that moves the file's ``_text`` onto ``text`` (from the page tables)."""
    ours = [s.address for s in f.symbols if s.name == "_text"]
    if not ours:
        raise GuestFormatError(f"--symbols {f.path}: has no _text symbol to rebase by")
    slide = (text - ours[0]) & (2**64 - 1)
    if slide >= 1 << 63:
        slide -= 1 << 64
    if slide % KASLR_ALIGN:
        raise GuestFormatError(
            f"--symbols {f.path}: its _text {ours[0]:#x} is not a 2 MiB step from the "
            f"guest's _text {text:#x} (a table of another kernel?)"
        )
    return slide


def rebased(f: SymbolFile, slide: int) -> list[Symbol]:
    """The file's symbols with kernel-image addresses moved by ``slide``."""
    out = []
    for s in f.symbols:
        a = s.address
        if KERNEL_MAP_START <= a < KERNEL_MAP_END:
            a += slide
            if not KERNEL_MAP_START <= a < KERNEL_MAP_END:
                raise GuestFormatError(
                    f"--symbols {f.path}: {s.name} moves out of the kernel image mapping"
                )
        out.append(Symbol(s.name, a, s.type))
    return out


def entry_problem(code: bytes) -> str | None:
    """Why ``code`` is not the entry of a traceable function (None when it is)."""
    at = 4 if code[:4] == _ENDBR or (len(code) >= 4 and _is_nop4(code[:4])) else 0
    site = code[at : at + 5]
    if site in _NOP5 or site[:1] == b"\xe8":
        return None
    return f"found {code[:12].hex()}"


def _is_nop4(b: bytes) -> bool:
    """A 4-byte NOP (``0f 1f 40 xx`` or ``66 0f 1f 00``): a sealed endbr."""
    return (b[:3] == b"\x0f\x1f\x40") or b == b"\x66\x0f\x1f\x00"


__all__ = ["SymbolFile", "entry_problem", "load_symbol_file", "rebased", "slide_of"]
