"""The symbol table library: a kernel's symbols by name and by address.

Built from kallsyms read out of guest memory (or imported from /proc/kallsyms, a
System.map or a Volatility ISF). Held as parallel arrays, not one object per symbol:
a kernel has up to ~160k symbols and a cached attach must stay well under a second.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator, Sequence

from vmshield.errors import SymbolError
from vmshield.guest.symbols import Symbol


class SymbolTable:
    """Symbols of one kernel, in table order, with name and address lookups."""

    def __init__(self, names: Sequence[str], addrs: Sequence[int], types: str) -> None:
        if not len(names) == len(addrs) == len(types):
            raise ValueError("symbol arrays differ in length")
        self.names = names
        self.addrs = addrs
        self.types = types
        # name -> first index of that name; built back to front in C (dict(zip)) so
        # earlier entries overwrite later ones: a cached attach does this for ~200k names
        n = len(names)
        self._index: dict[str, int] = dict(zip(reversed(names), range(n - 1, -1, -1), strict=True))
        self._order: list[int] | None = None
        self._sorted_addrs: list[int] = []

    @classmethod
    def from_symbols(cls, symbols: Iterable[Symbol]) -> SymbolTable:
        syms = list(symbols)
        return cls([s.name for s in syms], [s.address for s in syms], "".join(s.type for s in syms))

    def __len__(self) -> int:
        return len(self.names)

    def __iter__(self) -> Iterator[Symbol]:
        for i in range(len(self.names)):
            yield self._sym(i)

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def _sym(self, i: int) -> Symbol:
        return Symbol(self.names[i], self.addrs[i], self.types[i])

    def get(self, name: str) -> Symbol | None:
        i = self._index.get(name)
        return None if i is None else self._sym(i)

    def all_named(self, name: str) -> list[Symbol]:
        """Every symbol of that name (static functions may share one)."""
        return [self._sym(i) for i, n in enumerate(self.names) if n == name]

    def address(self, name: str) -> int:
        """Address of a symbol (the first of that name); SymbolError if the kernel lacks it."""
        i = self._index.get(name)
        if i is None:
            raise SymbolError(f"this kernel has no symbol {name!r}")
        return self.addrs[i]

    def first(self, *names: str) -> Symbol:
        """The first of several candidate symbols this kernel has (version fallbacks)."""
        for n in names:
            s = self.get(n)
            if s is not None:
                return s
        raise SymbolError(f"this kernel has none of the symbols {', '.join(names)}")

    def lookup(self, address: int) -> tuple[Symbol, int] | None:
        """The kernel-address symbol an address falls in, with the offset (``func+0x1a``)."""
        if self._order is None:
            self._order = sorted(
                (i for i, a in enumerate(self.addrs) if a >= 1 << 63), key=self.addrs.__getitem__
            )
            self._sorted_addrs = [self.addrs[i] for i in self._order]
        k = bisect.bisect_right(self._sorted_addrs, address) - 1
        if k < 0:
            return None
        i = self._order[k]
        return self._sym(i), address - self.addrs[i]

    def extent(self, name: str, limit: int) -> tuple[int, int]:
        """(address, size) of a data symbol: up to the next higher symbol address,
        at most ``limit`` bytes (kallsyms has no sizes)."""
        start = self.address(name)
        self.lookup(start)  # builds the sorted index
        k = bisect.bisect_right(self._sorted_addrs, start)
        nxt = self._sorted_addrs[k] if k < len(self._sorted_addrs) else start + limit
        return start, max(0, min(limit, nxt - start))

    def kallsyms_lines(self) -> Iterator[str]:
        """The table in ``/proc/kallsyms`` format (``%016x %c %s``)."""
        for n, a, t in zip(self.names, self.addrs, self.types, strict=True):
            yield f"{a:016x} {t} {n}"
