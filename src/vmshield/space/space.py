"""The security space in one guest: build, patch sites, drain, check, tear down.

Build (one parked task, see :mod:`vmshield.space.borrow`): the guest kernel's module
allocator gives one region ``[agent text][config][per-CPU rings]``; the relocated agent
is written into it through the gdbstub (QEMU invalidates translated code on such
writes), the text is made read-only + executable and the config read-only with the
kernel's own ``set_memory_*`` (which also fixes the direct-map alias and flushes every
CPU's TLB). Patching turns each point's ftrace NOP into ``call vms_gate`` with every
vCPU stopped, after marking the function's ftrace record DISABLED so that the guest's
ftrace never tries to rewrite our call (it would find unexpected bytes and shut ftrace
down). Draining and integrity checks read guest RAM directly: no VM exit.
"""

from __future__ import annotations

import contextlib
import ctypes as C
import hashlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from vmshield.errors import SymbolError, VmshieldError
from vmshield.guest.kconsts import tif_sigpending_bit
from vmshield.guest.kernel import Kernel
from vmshield.guest.paging import PageWalker
from vmshield.guest.tasks import current_task_offset
from vmshield.hv.gdbstub import GdbStub
from vmshield.hv.target import Target
from vmshield.paths import read_private, write_private
from vmshield.space import agent as agentlib
from vmshield.space import layout as L
from vmshield.space.alert import Alert
from vmshield.space.borrow import Borrow
from vmshield.space.rings import RingReader

PAGE = 0x1000
NOPS5 = (bytes.fromhex("0f1f440000"), bytes.fromhex("6666666690"))
MAX_FTRACE_PAGES = 20000
MAX_FTRACE_RECORDS = 200000
SAMPLE_INTERVAL_NS = 200_000_000


class SpaceError(VmshieldError):
    """The security space cannot be built, patched or removed as asked."""


class SpaceBusy(SpaceError):
    """A vCPU is executing inside the security space."""


class StaleSpace(SpaceError):
    """The state file describes a space the guest no longer holds."""


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
    nslots: int = L.NSLOTS
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


# Bits the CPU itself sets in page-table entries (accessed, dirty): not a change.
PTE_HW_BITS = (1 << 5) | (1 << 6)


def _pages(n: int) -> int:
    return (n + PAGE - 1) // PAGE


def _unseal_rox_cache(b: Borrow, r: Region) -> None:
    """7.x x86 serves ``execmem_alloc(EXECMEM_DEFAULT)`` from a cache of read-only +
    executable huge pages (ARCH_HAS_EXECMEM_ROX): the config and rings must not be
    executable and the rings must be writable, so do what ``execmem_alloc_rw`` does
    (``set_memory_nx`` + ``set_memory_rw`` on the whole region); ``r.rox_cache`` (set
    and saved by the caller first) makes teardown give the pages back read-only +
    executable, as the cache expects them."""
    k = b.k
    n = r.size // PAGE
    rc = [b.call("set_memory_nx", r.base, n), b.call("set_memory_rw", r.base, n)]
    k.walker.flush()
    if any(v & 0xFFFFFFFF for v in rc) or not k.walker.lookup(r.base).writable:
        raise SpaceError(f"cannot make the execmem ROX cache pages writable: {rc}")


def _give_back_permissions(b: Borrow, r: Region) -> None:
    """Before the region goes back to the allocator: read-write + NX as the module
    allocator gave it, or read-only + executable for the ROX cache (7.x)."""
    if r.rox_cache:
        b.call("set_memory_rox", r.base, r.size // PAGE)
    else:
        b.call("set_memory_nx", r.base, r.text_pages)
        b.call("set_memory_rw", r.base, r.text_pages + r.config_pages)


class SecuritySpace:
    """The agent region and its sites in one guest (see the module docstring)."""

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

    # -- guest memory helpers ---------------------------------------------------------

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

    # -- protected pages: frames recorded once, checked against fresh page walks ----------

    @property
    def walker(self) -> PageWalker:
        """A walker rooted at the kernel's own top-level table (``init_top_pgt``), not at
        the CR3 some task had at attach: that task may exit and its freed page table page
        be refilled by the guest with whatever it wants us to see."""
        if self._walker is None:
            k = self.k
            self._walker = k.walker
            for name in ("init_top_pgt", "swapper_pg_dir"):
                if name not in k.symbols:
                    continue
                try:
                    root = k.walker.translate(k.symbols.address(name))
                    w = PageWalker(k.walker.read_phys, root, k.walker.va_bits == 57)
                    w.lookup(k.text)
                except VmshieldError:
                    continue
                self._walker = w
                break
        return self._walker

    def _record(self, va: int, where: str) -> None:
        """Remember how the page of ``va`` is mapped now (build time: trusted)."""
        page = va & ~(PAGE - 1)
        if page in self.frames:
            return
        m, chain = self.walker.chain(page)
        self.frames[page] = Frame(where, page, m.pa + (page - m.va), m.writable, m.nx, chain)

    def _record_region(self) -> None:
        r = self.region
        assert r is not None
        for i, pa in enumerate(r.pages):
            va = r.base + i * PAGE
            what = ("text" if i < r.text_pages else
                    "config" if i < r.text_pages + r.config_pages else "ring")  # fmt: skip
            m, chain = self.walker.chain(va)
            want = {"text": (False, False), "config": (False, True), "ring": (True, True)}[what]
            if m.pa + (va - m.va) != pa or (m.writable, m.nx) != want:
                raise SpaceError(
                    f"security space {what} page {va:#x} is not mapped as built "
                    f"(pa {m.pa + (va - m.va):#x}, rw={m.writable}, nx={m.nx})"
                )
            self.frames[va] = Frame(f"security space {what}", va, pa, m.writable, m.nx, chain)

    def _start_rings(self) -> None:
        """The host's ring reader, from zeroed rings (build, adopt)."""
        r = self.region
        assert r is not None
        self.rings = RingReader(self._read, self._write_data, r.pa, r.rings_va, r.ring_stride,
                                r.ncpus, r.nslots)  # fmt: skip

    def _frame_read(self, va: int, n: int) -> bytes:
        """Bytes of protected pages at the frames recorded for them (the deep check makes
        sure the page tables still point there); other pages through a fresh walk."""
        out = bytearray()
        while n > 0:
            page = va & ~(PAGE - 1)
            m = min(n, PAGE - (va - page))
            f = self.frames.get(page)
            if f is not None:
                out += self.t.mem.read(f.pa + (va - page), m)
            else:
                out += self.walker.read(va, m)
            va, n = va + m, n - m
        return bytes(out)

    def _check_frames(self) -> list[Alert]:
        """Re-walk every protected page through the current page tables: a page mapped
        elsewhere, with other permissions, or not at all, is a ``pte`` alert carrying the
        entries that put it back."""
        alerts = []
        w = self.walker
        w.flush()
        for f in self.frames.values():
            want = f"pa={f.pa:#x} rw={f.writable} nx={f.nx}"
            try:
                m = w.lookup(f.va)
                pa = m.pa + (f.va - m.va)
                if (pa, m.writable, m.nx) == (f.pa, f.writable, f.nx):
                    continue
                found = f"pa={pa:#x} rw={m.writable} nx={m.nx}"
            except VmshieldError as e:
                found = f"unreadable: {e}"
            alerts.append(Alert("pte", f.where, f.va, want, found, self._chain_fix(f)))
        return alerts

    def _chain_fix(self, f: Frame) -> tuple[tuple[int, bytes], ...]:
        """The recorded entries that differ now (accessed/dirty bits aside), with their
        recorded values (keeping the current accessed/dirty bits)."""
        fix = []
        for at, value in f.chain:
            try:
                now = int.from_bytes(self.t.mem.read(at, 8), "little")
            except VmshieldError:
                continue
            if (now ^ value) & ~PTE_HW_BITS:
                put = (value & ~PTE_HW_BITS) | (now & PTE_HW_BITS)
                fix.append((at, put.to_bytes(8, "little")))
        return tuple(fix)

    # -- build ------------------------------------------------------------------------

    def build(self, b: Borrow, ncpus: int) -> None:
        """Allocate, write and protect the agent (a task must be parked in ``b``)."""
        k = self.k
        obj = agentlib.build().read_bytes()
        # Link once at a stand-in module address to learn the size; then at the real base.
        stand_in = 0xFFFFFFFFC0000000
        probe = agentlib.link(obj, stand_in, stand_in + (1 << 24), lambda s: stand_in)
        text_pages = _pages(len(probe.code))
        config_pages = _pages(C.sizeof(L.Config))
        nslots = ring_slots(sum(size for _, size in self.t.mem.ranges()), ncpus)
        region = Region(0, text_pages, config_pages, L.ring_bytes(nslots), ncpus, nslots)
        free = self._free_function()
        if "execmem_alloc" in k.symbols:
            base = b.call("execmem_alloc", 0, region.size, undo=free)  # EXECMEM_DEFAULT
        else:
            base = b.call("module_alloc", region.size, undo=free)
        if not base or base >> 63 == 0:
            raise SpaceError(f"the guest allocator returned {base:#x} (out of memory?)")
        region.base = base
        k.walker.flush()
        try:
            region.pages = [k.walker.translate(base + i * PAGE) for i in range(region.size // PAGE)]
            region.rox_cache = not k.walker.lookup(base).writable  # 7.x execmem ROX cache
            self.region = region
            self.phase = "building"
            self.save_state()  # from here on `vmshield detach` can free it
            if region.rox_cache:
                _unseal_rox_cache(b, region)
            self.image = agentlib.link(obj, base, region.config_va, self._resolve)
            code = self.image.code + b"\xcc" * (text_pages * PAGE - len(self.image.code))
            self._fill_config(ncpus)
            self._write_data(region.config_va, bytes(self.config))
            zero = bytes(PAGE)
            for i in range(ncpus * region.ring_stride // PAGE):
                self._write_data(region.rings_va + i * PAGE, zero)
            b.stub.write_memory(base, code)  # through QEMU: stale translations go away
            if self._read(base, len(code)) != code:
                raise SpaceError("the agent code did not land in guest memory")
            self._image_bytes = code
            self._protect(b, region)
            self.sync_time(b)
            self._record_region()
            self._start_rings()
            self.snapshot_tables()
        except BaseException:
            if b.call_in_flight:  # the guest still runs a call we started: touch nothing
                raise
            with contextlib.suppress(VmshieldError):
                # Read-only pages must not go back to the allocator (on 5.10 nothing
                # resets the direct-map alias at free time): undo, then free.
                _give_back_permissions(b, region)
                b.call(free, base)
                self.region = None
                self.state_path.unlink(missing_ok=True)
            self.region = None
            raise
        self._rehash()
        self.phase = "ready"
        self.save_state()

    def adopt(self, b: Borrow) -> None:
        """Take over a space built earlier (``vmshield space build``): re-link the agent
        for its address and check the guest still holds exactly that code; put back any
        site a vanished monitor left patched."""
        r = self.region
        if r is None:
            raise SpaceError("no security space to adopt")
        obj = agentlib.build().read_bytes()
        self.image = agentlib.link(obj, r.base, r.config_va, self._resolve)
        code = self.image.code + b"\xcc" * (r.text_pages * PAGE - len(self.image.code))
        if len(self.image.code) > r.text_pages * PAGE or self._read(r.base, len(code)) != code:
            raise SpaceError(
                f"the security space at {r.base:#x} does not hold this vmshield's agent "
                "(another build, or changed in the guest): `vmshield space destroy` it first"
            )
        self._image_bytes = code
        b.select()
        self.unpatch(b.stub)
        self.sites = []
        self.config = L.Config()
        self._fill_config(r.ncpus)
        self.write_config()
        self.snapshot_tables()
        # Records and counters of an earlier session must not pass for this one's.
        for cpu in range(r.ncpus):
            self._write_data(r.rings_va + cpu * r.ring_stride, bytes(C.sizeof(L.RingHeader)))
        self.walker.flush()
        self._record_region()  # the pages and their protections are checked just below
        self._start_rings()
        self.sync_time(b)
        self._rehash()
        self.save_state()

    def _free_function(self) -> str:
        return "execmem_free" if "execmem_free" in self.k.symbols else "module_memfree"

    def still_mapped(self) -> bool:
        """Whether the recorded region still maps to the frames it had (a state file can
        outlive the guest it describes: a reboot, a new QEMU)."""
        r = self.region
        if r is None:
            return False
        try:
            self.k.walker.flush()
            pages = [self.k.walker.translate(r.base + i * PAGE) for i in range(len(r.pages))]
        except VmshieldError:
            return False
        return pages == r.pages

    def holds_our_agent(self) -> bool:
        """Whether the guest still holds this vmshield's agent at the recorded address
        (a state file can outlive the guest it describes: a reboot, a new QEMU)."""
        r = self.region
        if r is None or not self.still_mapped():
            return False
        try:
            obj = agentlib.build().read_bytes()
            image = agentlib.link(obj, r.base, r.config_va, self._resolve)
        except VmshieldError:
            return False
        code = image.code + b"\xcc" * (r.text_pages * PAGE - len(image.code))
        if self._read(r.base, len(code)) != code:
            return False
        self.image, self._image_bytes = image, code
        return True

    def clear_sites(self, stub: GdbStub) -> None:
        """Unpatch every site and forget them, keeping the space (VM stopped, kernel-mode
        vCPU selected)."""
        self.unpatch(stub)
        self.sites = []
        self.config.nsites = 0
        self.config.sites = type(self.config.sites)()
        self.write_config()
        self._rehash()
        self.save_state()

    def snapshot_tables(self) -> None:
        """Reference copies of kernel tables a rootkit rewrites (syscall tables, IDT),
        with a sanity check of the syscall table: every entry must point into kernel
        text, or the copy is already corrupt and that is reported at the first check."""
        k = self.k
        self.tables, self.table_findings = {}, []
        lo, hi = k.symbols.address("_stext"), k.symbols.address("_etext")
        for name, limit in PROTECTED_TABLES:
            if name not in k.symbols:
                continue
            va, size = k.symbols.extent(name, limit)
            if size < 8:
                continue
            try:
                data = k.read(va, size)
            except VmshieldError:
                continue
            self.tables[name] = (va, data)
            for page in range(va & ~(PAGE - 1), va + size, PAGE):
                with contextlib.suppress(VmshieldError):
                    self._record(page, name)
            if name.endswith("sys_call_table"):
                ptrs = [int.from_bytes(data[j : j + 8], "little") for j in range(0, size - 7, 8)]
                while ptrs and ptrs[-1] == 0:  # alignment padding up to the next symbol
                    ptrs.pop()
                for i, ptr in enumerate(ptrs):
                    if not lo <= ptr < hi:
                        self.table_findings.append(Alert(
                            "kernel-table", f"{name}[{i}]", va + 8 * i,
                            "a kernel text address", f"{ptr:#x}"))  # fmt: skip

    def sync_time(self, b: Borrow) -> None:
        """Map the guest's monotonic clock to host time (it stops while the VM does, so
        this is redone whenever vmshield has the guest parked anyway)."""
        ns = b.call("ktime_get_mono_fast_ns")
        self.time_base = (ns, time.time())

    def _resolve(self, name: str) -> int:
        try:
            return self.k.symbols.address(name)
        except SymbolError as e:
            raise SpaceError(f"the agent needs {name}, which this kernel lacks") from e

    def _protect(self, b: Borrow, r: Region) -> None:
        k = self.k
        if "set_memory_rox" in k.symbols:
            rc = [b.call("set_memory_rox", r.base, r.text_pages)]
        else:
            rc = [b.call("set_memory_ro", r.base, r.text_pages),
                  b.call("set_memory_x", r.base, r.text_pages)]  # fmt: skip
        rc.append(b.call("set_memory_ro", r.config_va, r.config_pages))
        if any(v & 0xFFFFFFFF for v in rc):
            raise SpaceError(f"set_memory_* failed in the guest: {[hex(v) for v in rc]}")
        k.walker.flush()
        text = k.walker.lookup(r.base)
        conf = k.walker.lookup(r.config_va)
        if text.writable or text.nx or conf.writable or not conf.nx:
            raise SpaceError("the guest did not apply the page protections asked for")

    def _fill_config(self, ncpus: int) -> None:
        k, r, c = self.k, self.region, self.config
        assert r is not None
        off = k.member_offset
        c.magic = L.CONFIG_MAGIC
        c.ncpus = ncpus
        c.slot_size, c.nslots = L.SLOT_SIZE, r.nslots
        c.rings, c.ring_stride = r.rings_va, r.ring_stride
        c.page_offset_base = k.u64(k.symbols.address("page_offset_base"))
        c.la57 = int(k.walker.va_bits == 57)
        c.msr_mask = L.M_EFER | L.M_STAR | L.M_LSTAR | L.M_SYSENTER
        c.sample_interval_ns = SAMPLE_INTERVAL_NS
        c.pc_current = current_task_offset(k)
        c.tif_sigpending = tif_sigpending_bit(k)
        if "cpu_number" in k.symbols:
            c.pc_cpu = k.symbols.address("cpu_number")
        else:
            c.pc_cpu = k.symbols.address("pcpu_hot") + off("pcpu_hot", "cpu_number")
        c.t_pid, c.t_tgid = off("task_struct", "pid"), off("task_struct", "tgid")
        c.t_parent, c.t_cred = off("task_struct", "real_parent"), off("task_struct", "cred")
        c.t_comm, c.t_signal = off("task_struct", "comm"), off("task_struct", "signal")
        c.t_tiflags = off("task_struct", "thread_info.flags")
        c.sig_pending = off("signal_struct", "shared_pending.signal")
        c.c_uid, c.c_euid, c.c_gid = off("cred", "uid"), off("cred", "euid"), off("cred", "gid")
        c.path_dentry = off("path", "dentry")
        c.dentry_name = off("dentry", "d_name.name")
        w = self.walker
        if w is not k.walker:  # the kernel's own directory was found: tasks' are compared
            shift = 48 if w.va_bits == 57 else 39
            c.kernel_pgd = c.page_offset_base + w.root
            c.pgd_lo = (c.page_offset_base >> shift) & 0x1FF
            c.pgd_ldt = (-112 if w.va_bits == 57 else -240) & 0x1FF  # LDT_PGD_ENTRY_L5/_L4

    def write_config(self) -> None:
        """Publish the host's copy of the config (sites, rules) to the guest."""
        assert self.region is not None
        self._write_data(self.region.config_va, bytes(self.config))
        self._hashes["config"] = _sha(bytes(self.config))

    # -- sites --------------------------------------------------------------------------

    def add_site(self, symbol: str, address: int) -> int:
        """Reserve a config slot for a point (not yet live; see :meth:`patch`)."""
        for s in self.sites:
            if s.address == address:
                return s.index
        i = len(self.sites)
        if i >= L.MAX_SITES:
            raise SpaceError(f"at most {L.MAX_SITES} monitoring points in the security space")
        assert self.image is not None
        found = self.k.read(address, 5)
        if found not in NOPS5:
            raise SpaceError(f"{symbol}: no ftrace NOP at {address:#x} (found {found.hex()})")
        disp = self.image.gate - (address + 5)
        if not -(1 << 31) <= disp < 1 << 31:
            raise SpaceError(f"{symbol}: the gate is out of rel32 reach")
        call = b"\xe8" + disp.to_bytes(4, "little", signed=True)
        rec = self._ftrace_record(address)
        flags = self.k.u32(rec + 8) if rec else 0
        disabled = self.k.btf.enum_value(None, "FTRACE_FL_DISABLED")
        if flags & (1 << 31 | self._ftrace_count_mask()) or flags & disabled:
            raise SpaceError(f"{symbol} is in use by the guest's ftrace (flags {flags:#x})")
        st = SiteState(i, symbol, address, found.hex(), call.hex(),
                       rec + 8 if rec else None, flags, flags | disabled)  # fmt: skip
        self._record(address, symbol)
        self._record(address + 4, symbol)
        self.sites.append(st)
        s = self.config.sites[i]
        s.ret = address + 5
        s.path_item = s.port_item = -1
        self.config.nsites = len(self.sites)
        return i

    def _ftrace_count_mask(self) -> int:
        """The use-count bits of ``dyn_ftrace.flags``: below the lowest FTRACE_FL_* flag
        (23 bits on 5.10/6.1, 19 on 6.12, which added TOUCHED and MODIFIED)."""
        low = 1 << 31
        for name in FTRACE_FLAGS:
            try:
                v = self.k.btf.enum_value(None, name) & 0xFFFFFFFF
            except VmshieldError:
                continue
            if v:
                low = min(low, v)
        return low - 1

    def _ftrace_record(self, ip: int) -> int | None:
        """``struct dyn_ftrace *`` for ``ip`` (bounded walk of ``ftrace_pages_start``)."""
        k = self.k
        if "ftrace_pages_start" not in k.symbols:
            return None
        off = k.member_offset
        o_next, o_recs = off("ftrace_page", "next"), off("ftrace_page", "records")
        o_index = off("ftrace_page", "index")
        size = k.sizeof("dyn_ftrace")
        pg = k.u64(k.symbols.address("ftrace_pages_start"))
        seen = set()
        for _ in range(MAX_FTRACE_PAGES):
            if not pg or pg in seen:
                return None
            seen.add(pg)
            recs, n = k.u64(pg + o_recs), k.s32(pg + o_index)
            if 0 < n <= MAX_FTRACE_RECORDS and recs:
                first, last = k.u64(recs), k.u64(recs + (n - 1) * size)
                if first <= ip <= last:
                    lo, hi = 0, n - 1
                    while lo <= hi:
                        mid = (lo + hi) // 2
                        v = k.u64(recs + mid * size)
                        if v == ip:
                            return recs + mid * size
                        lo, hi = (mid + 1, hi) if v < ip else (lo, mid - 1)
            pg = k.u64(pg + o_next)
        return None

    def _ftrace_users(self) -> bool:
        """Whether any ftrace_ops is registered in the guest (tracer, kprobe, BPF...)."""
        k = self.k
        if "ftrace_ops_list" not in k.symbols or "ftrace_list_end" not in k.symbols:
            return True  # cannot tell: the safe answer
        return k.u64(k.symbols.address("ftrace_ops_list")) != k.symbols.address("ftrace_list_end")

    def _locks_free(self) -> bool:
        k = self.k
        for lock in ("ftrace_lock", "text_mutex"):
            if lock in k.symbols and k.u64(k.symbols.address(lock)):
                return False
        return True

    def patch(self, stub: GdbStub) -> None:
        """Make every site live (VM stopped, a kernel-mode vCPU selected)."""
        if not self._locks_free():
            raise SpaceBusy("the guest holds ftrace_lock or text_mutex")
        self.write_config()
        for s in self.sites:
            if s.live:
                continue
            s.live = True  # recorded before the write: a killed monitor's site is found
            self.save_state()
            if s.ftrace_flags_va is not None:
                self._write_data(s.ftrace_flags_va, s.ftrace_flags_after.to_bytes(4, "little"))
            stub.write_memory(s.address, bytes.fromhex(s.patched))
        self.save_state()

    def unpatch(self, stub: GdbStub) -> None:
        """Put every site's bytes and ftrace flags back (VM stopped, kernel-mode vCPU)."""
        for s in self.sites:
            if not s.live:
                continue
            if self.k.read(s.address, 5).hex() == s.patched:
                stub.write_memory(s.address, bytes.fromhex(s.original))
            if s.ftrace_flags_va is not None:
                if self._ftrace_users():
                    # ftrace skipped this record while it was DISABLED, so its use count
                    # misses the tracers registered meanwhile; clearing the flag now would
                    # let their removal underflow the count (a WARN, then ftrace shuts
                    # down). Leave it: the function stays untraceable until reboot.
                    self.left_disabled.append(s.symbol)
                else:
                    self._write_data(s.ftrace_flags_va, s.ftrace_flags_before.to_bytes(4, "little"))
            s.live = False
        self.save_state()

    # -- teardown ---------------------------------------------------------------------

    def inside(self, stub: GdbStub) -> list[tuple[int, int]]:
        """(vCPU, rip) of every vCPU executing agent code right now (VM stopped)."""
        r = self.region
        if r is None:
            return []
        out = []
        for tid in stub.threads():
            stub.select_thread(tid)
            rip = stub.read_register("rip")
            if r.base <= rip < r.base + r.text_pages * PAGE:
                out.append((tid - 1, rip))
        return out

    def busy(self) -> list[str]:
        """Why the space cannot be freed now (in-flight agent runs per ring)."""
        r = self.region
        if r is None:
            return []
        out = []
        for cpu in range(r.ncpus):
            h = self.ring_header(cpu)
            if h.inflight:
                out.append(f"cpu {cpu} is inside the agent")
        return out

    def destroy(self, b: Borrow) -> None:
        """Unpatch, wait out RCU-tasks, scrub, restore permissions, free.

        Each step is recorded in the state file first, so that a teardown (or build)
        whose monitor was killed goes on from where it stopped, never repeating the free
        (a double free would crash the guest; a missed one only leaks the region).
        """
        r = self.region
        if r is None:
            return
        known = self.still_mapped() if self.phase != "ready" else (
            self.image is not None or self.holds_our_agent())  # fmt: skip
        if self.phase != "freeing" and not known:
            self.state_path.unlink(missing_ok=True)
            raise StaleSpace(
                f"the guest no longer holds vmshield's agent at {r.base:#x} (rebooted or "
                "another VM behind the same socket): nothing touched, stale state removed"
            )
        if self.phase in ("ready", "building"):
            self._quiesce_and_scrub(b, r)
        if self.phase == "scrubbed":
            _give_back_permissions(b, r)
            self.phase = "freeing"
            self.save_state()
            b.call(self._free_function(), r.base)
        # "freeing": the free ran (a killed monitor's call is finished by borrowed())
        self.region = None
        self.state_path.unlink(missing_ok=True)

    def _quiesce_and_scrub(self, b: Borrow, r: Region) -> None:
        inside = self.inside(b.stub)
        if inside:
            raise SpaceBusy(
                "refusing to detach: vCPU "
                + ", ".join(f"{c} (rip {rip:#x})" for c, rip in inside)
                + " is executing inside the security space; try again"
            )
        b.select()
        self.unpatch(b.stub)
        k = self.k
        if "synchronize_rcu_tasks_rude" in k.symbols:
            b.call("synchronize_rcu_tasks_rude")
        if "synchronize_rcu_tasks" in k.symbols:
            b.call("synchronize_rcu_tasks")
        if (
            "synchronize_rcu_tasks" not in k.symbols
            and "synchronize_rcu_tasks_rude" not in k.symbols
        ):
            b.call("synchronize_rcu")  # the agent runs with IRQs off: an RCU-sched section
        # Every CPU has been through a context switch since the sites went away, and the
        # agent cannot sleep: a set in-flight flag now was written by the guest.
        self.forged_inflight = self.busy()
        b.stub.write_memory(r.base, b"\xcc" * (r.text_pages * PAGE))  # no agent code left
        self._write_data(r.config_va, bytes(r.config_pages * PAGE))
        zero = bytes(PAGE)  # nor any record: paths, argv, credentials
        for i in range(r.ncpus * r.ring_stride // PAGE):
            self._write_data(r.rings_va + i * PAGE, zero)
        self.phase = "scrubbed"
        self.save_state()

    # -- rings --------------------------------------------------------------------------

    def ring_header(self, cpu: int) -> L.RingHeader:
        r = self.region
        assert r is not None
        raw = self._read(r.rings_va + cpu * r.ring_stride, C.sizeof(L.RingHeader))
        return L.RingHeader.from_buffer_copy(raw)

    def drain(self, limit: int = 4096) -> Iterator[tuple[L.Record, bytes]]:
        """Records published since the last drain, per CPU in order, each once whatever
        the guest does to the ring headers (see :mod:`vmshield.space.rings`); findings
        come out of the next :meth:`check`, drops out of ``rings.take_dropped``."""
        if self.rings is None:
            return
        try:
            yield from self.rings.drain(limit)
        except VmshieldError as e:  # the region's frames are outside guest RAM: forged
            self.rings.findings.append(Alert("ring-state", "security space rings",
                                             self.region.rings_va if self.region else 0,
                                             "readable", f"unreadable: {e}"))  # fmt: skip

    def counters(self) -> dict[str, int]:
        r = self.region
        out = {"hits": 0, "drops": 0, "nested": 0, "denied": 0, "killed": 0}
        if r is None:
            return out
        for cpu in range(r.ncpus):
            h = self.ring_header(cpu)
            for key in out:
                out[key] += int(getattr(h, key))
        return out

    def host_time(self, ns: int) -> float:
        g0, h0 = self.time_base
        return h0 + (ns - g0) / 1e9

    # -- integrity ----------------------------------------------------------------------

    def _rehash(self) -> None:
        r = self.region
        assert r is not None
        self._hashes = {"agent-code": _sha(self._image_bytes), "config": _sha(bytes(self.config))}

    def check(self, deep: bool = False) -> list[Alert]:
        """Compare what the guest holds now with what we wrote. ``deep`` also re-walks
        the page tables of every protected page (agent, config, rings, sites, kernel
        tables): a remap to a forged copy defeats content hashes alone. Nothing the guest
        does here raises: a page that cannot be read is an alert."""
        r = self.region
        if r is None:
            return []
        alerts: list[Alert] = []
        try:
            self._check_contents(alerts)
        except VmshieldError as e:
            alerts.append(Alert("pte", "security space", r.base, "readable", f"unreadable: {e}"))
        if self.rings is not None:
            if deep:
                try:
                    self.rings.check_inflight()
                except VmshieldError as e:
                    alerts.append(Alert("ring-state", "security space rings", r.rings_va,
                                        "readable", f"unreadable: {e}"))  # fmt: skip
            alerts += self.rings.take_findings()
        if deep:
            alerts += self._check_frames()
            alerts += self.table_findings
            self.table_findings = []
            for name, (va, ref) in self.tables.items():
                try:
                    cur = self._frame_read(va, len(ref))
                except VmshieldError as e:
                    alerts.append(Alert("kernel-table", name, va, "readable", f"unreadable: {e}"))
                    continue
                if cur != ref:
                    at = next(i for i in range(len(ref)) if cur[i] != ref[i])
                    alerts.append(Alert("kernel-table", name, va + at,
                                        ref[at:at + 8].hex(), cur[at:at + 8].hex()))  # fmt: skip
        try:
            alerts += self._check_cpu_state()
        except VmshieldError as e:
            alerts.append(Alert("ring-state", "cpu samples", r.rings_va, "readable", str(e)))
        return alerts

    def _check_contents(self, alerts: list[Alert]) -> None:
        """Agent code, config, sites and ftrace flags against what we wrote (every drain)."""
        r = self.region
        assert r is not None
        code = self._read(r.base, r.text_pages * PAGE)
        if _sha(code) != self._hashes["agent-code"]:
            at = next(i for i, (a, b) in enumerate(zip(code, self._image_bytes, strict=True))
                      if a != b)  # fmt: skip
            want, got = self._image_bytes[at : at + 8].hex(), code[at : at + 8].hex()
            alerts.append(Alert("agent-code", "security space text", r.base + at, want, got))
        conf = self._read(r.config_va, C.sizeof(L.Config))
        if _sha(conf) != self._hashes["config"]:
            alerts.append(Alert("config", "security space config", r.config_va, "", ""))
        for s in self.sites:
            if not s.live:
                continue
            try:
                now = self._frame_read(s.address, 5).hex()
            except VmshieldError as e:
                now = f"unreadable: {e}"
            if now != s.patched:
                alerts.append(Alert("site", s.symbol, s.address, s.patched, now))
            if s.ftrace_flags_va is not None:
                try:
                    f = int.from_bytes(self.walker.read(s.ftrace_flags_va, 4), "little")
                    found = f"{f:#x}"
                except VmshieldError as e:
                    f, found = -1, f"unreadable: {e}"
                if f != s.ftrace_flags_after:
                    alerts.append(Alert("ftrace-flags", s.symbol, s.ftrace_flags_va,
                                        f"{s.ftrace_flags_after:#x}", found))  # fmt: skip

    def _check_cpu_state(self) -> list[Alert]:
        r = self.region
        assert r is not None
        alerts = []
        for cpu in range(r.ncpus):
            s = self.ring_header(cpu).sample
            if not s.count:
                continue
            now = {f: int(getattr(s, f)) for f in CPU_FIELDS}
            now["cr4"] &= ~CR4_PER_TASK
            first = self.baseline.setdefault(cpu, now)
            if first is now:
                alerts += self._record_idt(cpu, now["idt_base"])
            if s.pgd_bad != self._pgd_bad.get(cpu, 0):
                self._pgd_bad[cpu] = int(s.pgd_bad)
                bits = self.walker.va_bits
                va = (int(s.pgd_index) & 0x1FF) << (bits - 9)
                if va >> (bits - 1):  # the kernel half: sign-extended
                    va |= ((1 << 64) - 1) ^ ((1 << bits) - 1)
                alerts.append(Alert(
                    "pte", f"cpu {cpu} page directory {s.cr3:#x} (CR3) entry {s.pgd_index}",
                    va, "the kernel's own entry (init_top_pgt)", f"{s.pgd_found:#x}"))  # fmt: skip
            for f in CPU_FIELDS:
                if now[f] != first[f]:
                    alerts.append(Alert("cpu-state", f"cpu {cpu} {f}", 0,
                                        f"{first[f]:#x}", f"{now[f]:#x}"))  # fmt: skip
                    first[f] = now[f]  # report each change once
        return alerts

    def _record_idt(self, cpu: int, idt_base: int) -> list[Alert]:
        """Protect the IDT as the CPU reaches it: IDTR holds a read-only alias (the CPU
        entry area), which must map the very frame of ``idt_table`` that the table check
        reads; from then on the alias is re-walked with the other protected pages."""
        where = f"cpu {cpu} IDT (IDTR)"
        try:
            self._record(idt_base, where)
        except VmshieldError as e:
            return [Alert("pte", where, idt_base, "mapped", f"unreadable: {e}")]
        alias = self.frames[idt_base & ~(PAGE - 1)]
        table = self.tables.get("idt_table")
        own = self.frames.get(table[0] & ~(PAGE - 1)) if table else None
        if own is not None and alias.pa != own.pa:
            return [Alert("pte", where, idt_base, f"pa={own.pa:#x} (idt_table)",
                          f"pa={alias.pa:#x}")]  # fmt: skip
        return []

    def repair(self, b: Borrow, alerts: list[Alert]) -> list[Alert]:
        """Re-arm after tampering: write our bytes back (VM stopped, kernel-mode vCPU
        selected in ``b``). Returns the alerts really repaired: a page-table repair counts
        only once a fresh walk finds the page where it was; the others stay reported."""
        r = self.region
        assert r is not None
        stub = b.stub
        done: list[Alert] = []
        ptes: list[Alert] = []
        for a in alerts:
            try:
                if a.what == "pte":
                    if a.fix:
                        for at, value in a.fix:
                            self.t.mem.write(at, value)
                        ptes.append(a)
                    continue
                if a.fix:  # ring counters and flags: data in guest RAM
                    for at, value in a.fix:
                        self.t.mem.write(at, value)
                elif a.what == "agent-code":
                    stub.write_memory(r.base, self._image_bytes)
                elif a.what == "config":
                    self.write_config()
                elif a.what == "site":
                    s = next(s for s in self.sites if s.address == a.address)
                    stub.write_memory(s.address, bytes.fromhex(s.patched))
                elif a.what == "kernel-table" and a.where in self.tables:
                    va, want = self.tables[a.where]
                    self._write_frames(va, want)  # data read by the CPU: no TB issue
                elif a.what == "ftrace-flags":
                    s = next(s for s in self.sites if s.ftrace_flags_va == a.address)
                    self._write_data(a.address, s.ftrace_flags_after.to_bytes(4, "little"))
                else:
                    continue
            except (VmshieldError, StopIteration):
                continue
            done.append(a)
        if ptes:
            # Every CPU may still hold the forged translation: the guest's own flush.
            for fn in ("flush_tlb_all", "__flush_tlb_all"):
                if fn in self.k.symbols:
                    b.call(fn)
                    break
            self.walker.flush()
            self.k.walker.flush()
            standing = {(a.address, a.where) for a in self._check_frames()}
            done += [a for a in ptes if (a.address, a.where) not in standing]
        return done

    def _write_frames(self, va: int, data: bytes) -> None:
        """Data writes to protected pages go to their recorded frames."""
        pos = 0
        while pos < len(data):
            a = va + pos
            page = a & ~(PAGE - 1)
            n = min(len(data) - pos, PAGE - (a - page))
            f = self.frames.get(page)
            if f is not None:
                self.t.mem.write(f.pa + (a - page), data[pos : pos + n])
            else:
                self._write_data(a, data[pos : pos + n])
            pos += n

    # -- persistence (for `vmshield detach` after a crash) --------------------------------

    def save_state(self) -> None:
        r = self.region
        if r is None:
            return
        # Written whole then renamed: a monitor killed mid-write leaves the old state.
        tmp = self.state_path.with_suffix(f".tmp{os.getpid()}")
        write_private(tmp, json.dumps({
            "region": asdict(r), "sites": [asdict(s) for s in self.sites],
            "time_base": list(self.time_base), "owned": self.owned, "user_pid": self.user_pid,
            "phase": self.phase,
        }).encode())  # fmt: skip
        tmp.replace(self.state_path)

    def in_use_by(self) -> int | None:
        """The pid of another live process (a monitor) using this space, if any."""
        pid = self.user_pid
        if pid is None or pid == os.getpid():
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            return pid
        return pid

    @classmethod
    def load_state(cls, target: Target, kernel: Kernel) -> SecuritySpace | None:
        sp = cls(target, kernel)
        if not sp.state_path.is_file():
            return None
        try:
            d: dict[str, Any] = json.loads(read_private(sp.state_path))
            sp.region = Region(**d["region"])
            sp.sites = [SiteState(**s) for s in d["sites"]]
            ns, host = d.get("time_base", (0, 0.0))
            sp.time_base = (int(ns), float(host))
            sp.owned = bool(d.get("owned", True))
            sp.phase = str(d.get("phase", "ready"))
            if sp.phase not in ("building", "ready", "scrubbed", "freeing"):
                raise ValueError(f"unknown phase {sp.phase!r}")
            user = d.get("user_pid")
            sp.user_pid = int(user) if user is not None else None
        except (TypeError, ValueError, KeyError, AttributeError, OSError) as e:
            raise SpaceError(f"{sp.state_path}: unreadable security space state ({e})") from e
        return sp


# Kernel tables whose change is a classic rootkit move, and their size bounds.
PROTECTED_TABLES = (("sys_call_table", 8 * 1024), ("ia32_sys_call_table", 8 * 1024),
                    ("x32_sys_call_table", 8 * 1024), ("idt_table", 16 * 256))  # fmt: skip
# CR4 bits the kernel flips per task on context switch: TSD (prctl PR_SET_TSC), PCE (rdpmc).
CR4_PER_TASK = (1 << 2) | (1 << 8)
FTRACE_FLAGS = (
    "FTRACE_FL_ENABLED", "FTRACE_FL_REGS", "FTRACE_FL_REGS_EN", "FTRACE_FL_TRAMP",
    "FTRACE_FL_TRAMP_EN", "FTRACE_FL_IPMODIFY", "FTRACE_FL_DISABLED", "FTRACE_FL_DIRECT",
    "FTRACE_FL_DIRECT_EN", "FTRACE_FL_CALL_OPS", "FTRACE_FL_CALL_OPS_EN", "FTRACE_FL_TOUCHED",
    "FTRACE_FL_MODIFIED",
)  # fmt: skip


def ring_slots(ram_bytes: int, ncpus: int) -> int:
    """Slots per CPU ring: 4096, fewer when all rings would exceed 1/64 of guest RAM
    (the allocation is GFP_KERNEL: it must not push a small guest into its OOM killer)."""
    fit = ram_bytes // 64 // max(1, ncpus) // L.SLOT_SIZE
    return max(256, min(L.NSLOTS, 1 << max(0, fit.bit_length() - 1)))


CPU_FIELDS = ("cr0", "cr4", "efer", "star", "lstar", "sysenter_eip", "idt_base",
              "idt_limit", "gdt_base", "gdt_limit")  # fmt: skip


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()
