"""What every part of the security space shares: the region's geometry, the patched
sites, the host's copy of the config, and guest memory access in and out of the region.

:class:`vmshield.space.space.SecuritySpace` is built up by job, one module each, every
layer using only itself and the layers below: ``base`` -> ``state`` (persistence) ->
``frames`` (protected pages and kernel tables) -> ``draining`` (rings) -> ``integrity``
(check and repair) -> ``sites`` (patching, ftrace flags) -> ``region`` (build, adopt,
destroy).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from vmshield.errors import SymbolError
from vmshield.guest.kernel import Kernel
from vmshield.guest.paging import PageWalker
from vmshield.hv.target import Target
from vmshield.space import agent as agentlib
from vmshield.space import layout as L
from vmshield.space.alert import Alert
from vmshield.space.errors import SpaceError
from vmshield.space.rings import RingReader

PAGE = 0x1000


def pages(n: int) -> int:
    return (n + PAGE - 1) // PAGE


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


@dataclass
class SiteState:
    """One patched point, with everything needed to put it back."""

    index: int
    symbol: str
    address: int  # the NOP
    original: str  # hex of the 5 bytes found there
    patched: str  # hex of our call
    ftrace_flags_va: int | None
    ftrace_flags_before: int
    ftrace_flags_after: int
    live: bool = False


@dataclass
class Region:
    base: int
    text_pages: int
    config_pages: int
    ring_stride: int
    ncpus: int
    ring_size: int = L.RING_SIZE  # bytes of records per CPU
    pages: list[int] = field(default_factory=list)  # PA of every page, in VA order
    rox_cache: bool = False  # came read-only + executable from execmem's ROX cache (7.x)

    @property
    def config_va(self) -> int:
        return self.base + self.text_pages * PAGE

    @property
    def rings_va(self) -> int:
        return self.config_va + self.config_pages * PAGE

    @property
    def size(self) -> int:
        return (self.text_pages + self.config_pages) * PAGE + self.ncpus * self.ring_stride

    def pa(self, va: int) -> int:
        i = (va - self.base) // PAGE
        if not 0 <= i < len(self.pages):
            raise SpaceError(f"{va:#x} is outside the security space")
        return self.pages[i] + (va & 0xFFF)


@dataclass(frozen=True)
class Frame:
    """A protected page as it was mapped when vmshield took it over: the frame its
    virtual address translated to, the permissions, and the page-table entries of that
    walk (to put them back). Checks re-walk the page tables and compare; they never read
    a protected page through an old translation."""

    where: str
    va: int  # page-aligned
    pa: int  # of this 4 KiB page
    writable: bool
    nx: bool
    chain: tuple[tuple[int, int], ...]


class SpaceBase:
    """The state the jobs share and guest memory access (see the module docstring)."""

    def __init__(self, target: Target, kernel: Kernel) -> None:
        self.t = target
        self.k = kernel
        self.region: Region | None = None
        self.image: agentlib.Image | None = None
        self.config = L.Config()
        self.sites: list[SiteState] = []
        self.time_base: tuple[int, float] = (0, 0.0)  # (guest mono ns, host time)
        self.baseline: dict[int, dict[str, int]] = {}  # cpu -> first CPU-state sample
        self._hashes: dict[str, str] = {}
        self._image_bytes = b""
        self.owned = True  # built by this session (freed on detach), or adopted
        self.user_pid: int | None = None  # the monitor process using the space now
        self.left_disabled: list[str] = []  # see unpatch()
        self.forged_inflight: list[str] = []  # see destroy()
        # Where build/teardown stand, persisted so that a monitor killed half-way can be
        # finished by `vmshield detach`: building -> ready -> scrubbed -> freeing.
        self.phase = "ready"
        self.rings: RingReader | None = None  # the host's own ring state (see rings.py)
        self.frames: dict[int, Frame] = {}  # protected page VA -> how it was mapped
        self._walker: PageWalker | None = None
        self._pgd_bad: dict[int, int] = {}  # cpu -> samples with a foreign kernel half
        self.tables: dict[str, tuple[int, bytes]] = {}  # protected kernel tables
        self.table_findings: list[Alert] = []  # found wrong when first read
        self.state_path = target.gdb_path().with_suffix(".space.json")

    def _write_data(self, va: int, data: bytes) -> None:
        """Data writes (config, rings, ftrace flags) go straight to guest RAM."""
        pos = 0
        while pos < len(data):
            a = va + pos
            n = min(len(data) - pos, PAGE - (a & 0xFFF))
            pa = self.region.pa(a) if self.region and self._inside(a) else (
                self.k.walker.translate(a))  # fmt: skip
            self.t.mem.write(pa, data[pos : pos + n])
            pos += n

    def _read(self, va: int, n: int) -> bytes:
        if self.region and self._inside(va):
            out = bytearray()
            pos = 0
            while pos < n:
                a = va + pos
                m = min(n - pos, PAGE - (a & 0xFFF))
                out += self.t.mem.read(self.region.pa(a), m)
                pos += m
            return bytes(out)
        return self.k.read(va, n)

    def _inside(self, va: int) -> bool:
        r = self.region
        return r is not None and r.base <= va < r.base + r.size

    def write_config(self) -> None:
        """Publish the host's copy of the config (sites, rules) to the guest."""
        assert self.region is not None
        self._write_data(self.region.config_va, bytes(self.config))
        self._hashes["config"] = sha(bytes(self.config))

    def _resolve(self, name: str) -> int:
        try:
            return self.k.symbols.address(name)
        except SymbolError as e:
            raise SpaceError(f"the agent needs {name}, which this kernel lacks") from e
