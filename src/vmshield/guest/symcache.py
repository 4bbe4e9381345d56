"""Per-build cache of the symbol table library.

A build is keyed by the SHA-256 of its kallsyms token table and index (found in a few
milliseconds; they differ between any two builds). A cached entry is only used after the
whole kallsyms span in guest memory hashes to what was cached (with the relocated
``kallsyms_relative_base`` zeroed, since KASLR changes it every boot), so a guest cannot
make vmshield use a stale or foreign table.

The entry also remembers every BTF member offset and type size resolved so far, so a
cached attach never parses BTF. Those layouts are derived from the BTF blob, not from
kallsyms, so they are filed under the SHA-256 of the BTF bytes they came from: two
guests of the same build whose BTF differs (one guest's kernel attacker rewrote its
own) share the symbols but never each other's offsets. Each attach hashes its own
guest's BTF before it uses any cached layout (a few milliseconds for 5 MB).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import tempfile
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmshield.errors import GuestFormatError
from vmshield.guest import kallsyms

FORMAT = 2
# BTF variants remembered per build: a guest that keeps rewriting its BTF cannot grow the
# entry without bound, and evicting one variant only costs that guest a BTF parse.
MAX_BTF_VARIANTS = 4
_HEX64 = frozenset("0123456789abcdef")


def _is_sha256(s: str) -> bool:
    return len(s) == 64 and set(s) <= _HEX64


def _span_hash(blob: bytes, lo: int, hi: int, rb_at: int) -> str:
    data = bytearray(blob[lo:hi])
    if lo <= rb_at < hi:
        data[rb_at - lo : rb_at - lo + 8] = bytes(8)
    return hashlib.sha256(data).hexdigest()


@dataclass
class CachedBuild:
    """One kernel build's decoded symbols and resolved layouts."""

    key: str
    span: tuple[int, int]
    span_sha256: str
    rb_at: int
    names: list[str]
    types: str
    offsets: list[int]
    # SHA-256 of a BTF blob -> {"struct.path": offset, "sizeof:type": size} resolved from it
    layouts: dict[str, dict[str, int]] = field(default_factory=dict)
    encoding: str = "relative-percpu"  # how offsets encode addresses (kallsyms.ENCODINGS)
    offsets_at: int = -1  # blob offset of the entries (place-relative addresses need it)
    dirty: bool = False

    @classmethod
    def from_decoded(
        cls, key: str, blob: bytes, t: kallsyms.KallsymsTables, d: kallsyms.Decoded
    ) -> CachedBuild:
        lo, hi = t.span()
        return cls(
            key=key,
            span=(lo, hi),
            span_sha256=_span_hash(blob, lo, hi, t.relative_base_at),
            rb_at=t.relative_base_at,
            names=d.names,
            types=d.types,
            offsets=d.offsets,
            encoding=t.encoding,
            offsets_at=t.offsets,
            dirty=True,
        )

    def matches(self, blob: bytes) -> bool:
        lo, hi = self.span
        return hi <= len(blob) and _span_hash(blob, lo, hi, self.rb_at) == self.span_sha256

    def relative_base(self, blob: bytes) -> int:
        if self.rb_at < 0:
            return 0  # 7.0+: no kallsyms_relative_base
        return int.from_bytes(blob[self.rb_at : self.rb_at + 8], "little")

    def addresses(self, blob: bytes, base_va: int) -> list[int]:
        """Every symbol's address in this boot (``blob`` is the data at ``base_va``)."""
        return kallsyms.addresses(
            self.offsets, self.relative_base(blob), self.encoding, base_va + self.offsets_at
        )

    def layout(self, btf_sha256: str, key: str) -> int | None:
        """A layout resolved earlier from a BTF blob with exactly this hash, or None."""
        return self.layouts.get(btf_sha256, {}).get(key)

    def remember(self, btf_sha256: str, key: str, value: int) -> None:
        """File a layout under the hash of the BTF bytes it was resolved from."""
        if not _is_sha256(btf_sha256):
            raise ValueError(f"not a SHA-256 hex digest: {btf_sha256!r}")
        table = self.layouts.get(btf_sha256)
        if table is None:
            while len(self.layouts) >= MAX_BTF_VARIANTS:
                del self.layouts[next(iter(self.layouts))]  # oldest variant first
            table = self.layouts[btf_sha256] = {}
        table[key] = value
        self.dirty = True

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "key": self.key,
            "span": list(self.span),
            "span_sha256": self.span_sha256,
            "rb_at": self.rb_at,
            "names": "\n".join(self.names),
            "types": self.types,
            "offsets": base64.b64encode(array("i", self.offsets).tobytes()).decode(),
            "layouts": self.layouts,
            "encoding": self.encoding,
            "offsets_at": self.offsets_at,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> CachedBuild:
        if d.get("format") != FORMAT:
            raise GuestFormatError("cache entry has another format")
        offs = array("i")
        offs.frombytes(base64.b64decode(d["offsets"]))
        names = d["names"].split("\n")
        if not len(names) == len(d["types"]) == len(offs):
            raise GuestFormatError("cache entry arrays differ in length")
        return cls(
            key=d["key"],
            span=(int(d["span"][0]), int(d["span"][1])),
            span_sha256=d["span_sha256"],
            rb_at=int(d["rb_at"]),
            names=names,
            types=d["types"],
            offsets=offs.tolist(),
            layouts=_layouts_from_json(d["layouts"]),
            encoding=str(d.get("encoding", "relative-percpu")),
            offsets_at=int(d.get("offsets_at", -1)),
        )


def _layouts_from_json(raw: Any) -> dict[str, dict[str, int]]:
    """Layouts per BTF hash, with every key and value checked (a damaged file is a miss)."""
    if not isinstance(raw, dict) or len(raw) > MAX_BTF_VARIANTS:
        raise GuestFormatError("cache entry layouts are not a small object")
    out: dict[str, dict[str, int]] = {}
    for digest, table in raw.items():
        if not isinstance(digest, str) or not _is_sha256(digest) or not isinstance(table, dict):
            raise GuestFormatError("cache entry layouts are not keyed by BTF hash")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in table.values()):
            raise GuestFormatError("cache entry layout values are not integers")
        out[digest] = {str(k): int(v) for k, v in table.items()}
    return out


class SymbolCache:
    """Cache entries as JSON files under a folder (``cache_dir()/symtab``)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def _path(self, key: str) -> Path:
        return self.folder / f"{key}.json"

    def load(self, key: str, blob: bytes) -> CachedBuild | None:
        try:
            data = json.loads(self._path(key).read_text())
            build = CachedBuild.from_json(data)
        except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError,
                GuestFormatError):  # fmt: skip
            return None  # a damaged or foreign entry is a cache miss, never an error
        return build if build.key == key and build.matches(blob) else None

    def store(self, build: CachedBuild) -> None:
        """Atomic write (temp file + rename) so concurrent attaches never see half a file."""
        self.folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.folder, suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(build.to_json(), f)
            os.replace(tmp, self._path(build.key))
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        build.dirty = False
