"""Sensitive-module isolation: kernel integrity and CPU state as isolation objects.

One host-side implementation serves both engines. Guest memory is read through shared
RAM (no VM exit); control registers come from QMP ``info registers -a``; the MSRs
(LSTAR, CSTAR, STAR, SYSENTER_*), which QEMU's interfaces do not show, are read and
written back by a one-instruction probe stepped on each vCPU
(:mod:`vmshield.monitor.msrprobe`). Each engine calls :meth:`Checker.tick` from its own
loop and lends a *quiesced* gdbstub (every vCPU stopped) for the probe and for the
writes that must go through QEMU: code (TCG only drops stale translations for writes
QEMU makes) and registers. Data is put back through shared RAM. The exit engine also
calls :meth:`Checker.at_stop` when a vCPU stops at one of its points: the small tables,
that vCPU's control registers (already read for the hit) and MSRs, at most every
:data:`STOP_CHECK_GAP` seconds.

Why a reference taken after boot, and the kernel's own patch tables: alternatives,
retpolines and boot-time patching are done by then; what the kernel still rewrites at
run time (jump labels, static calls, ftrace, kprobes) is explained site by site
(:mod:`vmshield.guest.kintegrity`), so a foreign write is never hidden by them and they
never raise an alarm.

Guest memory is hostile: every walk is bounded; a page that cannot be read is an
alert (``what`` = ``unreadable``), never an exception that ends the monitor.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from vmshield.errors import SymbolError, VmshieldError
from vmshield.guest import kintegrity as ki
from vmshield.guest.kernel import Kernel
from vmshield.guest.lists import walk_entries
from vmshield.guest.modules import ModuleInfo, modules
from vmshield.guest.paging import PageWalker
from vmshield.guest.tasks import TaskReader, current_task
from vmshield.hv.gdbstub import GdbStub
from vmshield.hv.target import CpuState, Target
from vmshield.monitor.actions import DumpPolicy, pause_vm
from vmshield.monitor.events import Event, PointInfo, ProcessContext
from vmshield.monitor.msrprobe import MSRS, MsrProbe, ProbeSkipped

OBJECTS = (
    "kernel.text",
    "kernel.rodata",
    "kernel.syscall_table",
    "kernel.idt",
    "cpu.control",
    "cpu.msr",
    "kernel.modules",
    "space.self",
)
RESTORABLE = frozenset({"kernel.text", "kernel.rodata", "kernel.syscall_table", "kernel.idt",
                        "cpu.control", "cpu.msr"})  # fmt: skip

CR0_WP = 1 << 16
CR4_UMIP, CR4_SMEP, CR4_SMAP = 1 << 11, 1 << 20, 1 << 21
EFER_NXE = 1 << 11
CONTROL_BITS: dict[str, tuple[tuple[str, int], ...]] = {
    "cr0": (("WP", CR0_WP),),
    "cr4": (("SMEP", CR4_SMEP), ("SMAP", CR4_SMAP), ("UMIP", CR4_UMIP)),
    "efer": (("NXE", EFER_NXE),),
}
MSR_EXPECTED = {"lstar": "entry_SYSCALL_64"}
"""The kernel's own value of an MSR, from its symbols: a redirect made before the
monitor armed is still seen (the other MSRs are referenced at their first reading)."""
STOP_CHECK_GAP = 0.25
"""Seconds between two checks at the exit engine's stops: a point hit thousands of times
a second must not pay for a check each time (at most 4 a second, a few KiB read and
one vCPU probed each)."""
CHUNK = 1 << 16  # bytes compared at once; a differing chunk is diffed byte by byte
MAX_TEXT = 64 << 20
MAX_SYSCALLS = 1024
MAX_FTRACE_PAGES = 1 << 14
MAX_FTRACE_RECORDS = 1 << 18
FTRACE_TRIES = 5
RETRY_PAUSE = 0.05  # seconds before a failed walk of changing guest structures is redone
MODULE_LOOKUPS = 5  # walks of the module list before a requested module is "not loaded"
FTRACE_CALL_SITES = ("ftrace_call", "ftrace_regs_call", "ftrace_graph_call")
KPROBE_TABLE_SIZE = 64
MAX_KPROBES = 4096
MAX_KOBJECTS = 8192
MODULES_END = 0xFFFF_FFFF_FF00_0000  # x86-64: the module area ends here (fixmap above)
HUGE = 2 << 20
MAX_EXEC_PAGES = 1 << 18  # 1 GiB of 4 KiB pages: the whole module area
MOD_MEM_TYPES = 7  # enum mod_mem_type (6.4+): text, data, rodata, ro_after_init, init *3


Quiesce = Callable[[Callable[[GdbStub], None]], None]
"""Runs a function with a gdbstub while every vCPU is stopped (the engine's own)."""


@dataclass
class Region:
    """Bytes watched against a reference: ``code`` regions are written back through the
    gdbstub, the others through shared RAM."""

    object: str
    name: str  # "core", a module's name, "sys_call_table", ...
    va: int
    ref: bytes
    code: bool
    sites: list[ki.Site] = field(default_factory=list)
    entry: int = 0  # >0: a table of entries this wide (syscall: 8, IDT: 16)


@dataclass
class Finding:
    """One change: what, where, the values, and what was done."""

    object: str
    what: str
    where: str
    address: int
    old: str
    new: str
    cpu: int | None = None
    task: int | None = None
    restore: Callable[[Quiesce], None] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class IntegrityStats:
    checks: int = 0
    findings: int = 0
    restored: int = 0
    check_seconds: float = 0.0
    bytes_watched: int = 0
    stop_checks: int = 0
    stopped_seconds: float = 0.0  # wall time the VM stood still for the MSR probe
    probe_errors: int = 0  # MSR probes that failed (not skipped): our side, not the guest's
    last_probe_error: str = ""


class Checker:
    """The integrity objects of a monitor, checked at an interval from the host."""

    def __init__(
        self,
        target: Target,
        kernel: Kernel,
        requests: list[Any],  # IsolationRequest (not imported: kept a leaf of monitor)
        emit: Callable[[Event], None],
        engine: str,
        interval: float = 1.0,
        dump_policy: DumpPolicy | None = None,
    ) -> None:
        self.t, self.k, self.emit, self.engine = target, kernel, emit, engine
        self.requests = {r.object: r for r in requests}
        self.interval = interval
        self.dumps = dump_policy
        self.stats = IntegrityStats()
        self.regions: list[Region] = []
        self.cpu_ref: dict[int, dict[str, int]] = {}
        self.msr_ref: dict[int, dict[str, int]] = {}
        self.probe: MsrProbe | None = None
        self._last_stop = 0.0
        self.module_view: set[int] = set()
        self.hidden_seen: set[int] = set()
        self.suspects: set[int] = set()
        self.exec_seen: set[int] = set()
        self.exec_suspects: set[int] = set()
        # The monitor's own executable memory (the security space): not a finding.
        self.own_memory: Callable[[], list[tuple[int, int]]] | None = None
        self.reported: dict[tuple[str, int], str] = {}  # place -> last new value reported
        self.restores: dict[tuple[str, int], int] = {}
        self._next = 0.0
        self._tasks = TaskReader(kernel)

    # -- reference ----------------------------------------------------------------------

    def reference(self) -> None:
        """Take the reference: the bytes and values as they are now (after boot)."""
        k, want = self.k, self.requests
        self._kernel_root()
        k.walker.flush()  # module-area addresses are reused: no translation from before
        sites = self._sites() if "kernel.text" in want else []
        if "kernel.text" in want:
            module = want["kernel.text"].filters.get("module")
            if module is None or module == "core":
                start = k.symbols.address("_stext")
                end = k.symbols.address("_etext")
                if not 0 < end - start <= MAX_TEXT:
                    raise VmshieldError(f"kernel text {start:#x}..{end:#x} is implausible")
                text = k.read(start, end - start)
                sites = ki.sized_jump_sites(sites, text, start)
                self.regions.append(Region("kernel.text", "core", start, text, True, sites))
            else:
                self.regions.append(self._module_text(module, sites))
        if "kernel.rodata" in want:
            start = k.symbols.address("__start_rodata")
            end = k.symbols.address("__end_rodata")
            if not 0 < end - start <= MAX_TEXT:
                raise VmshieldError(f"kernel rodata {start:#x}..{end:#x} is implausible")
            self.regions.append(
                Region("kernel.rodata", "rodata", start, k.read(start, end - start), False)
            )
        if "kernel.syscall_table" in want:
            for name in ("sys_call_table", "ia32_sys_call_table", "x32_sys_call_table"):
                if name in k.symbols:
                    va, size = k.symbols.extent(name, 8 * MAX_SYSCALLS)
                    size -= size % 8
                    self.regions.append(
                        Region("kernel.syscall_table", name, va, k.read(va, size), False, entry=8)
                    )
        if "kernel.idt" in want:
            va = k.symbols.address("idt_table")
            self.regions.append(Region("kernel.idt", "idt_table", va, k.read(va, 4096), False,
                                       entry=16))  # fmt: skip
        if "cpu.control" in want or "kernel.idt" in want:
            self.cpu_ref = {c.index: _cpu_values(c) for c in self.t.cpus()}
        if "cpu.msr" in want:
            self.probe = MsrProbe(k)
        if "kernel.modules" in want:
            self.module_view = {m.address for m in modules(self.k) if m.address}
        self.stats.bytes_watched = sum(len(r.ref) for r in self.regions)

    def _kernel_root(self) -> None:
        """Keep the kernel's page walker at the kernel's own top-level table, looked up
        through the CR3s the vCPUs have now as well (the walker's root may be a freed
        table already: seen on 7.3, the module list "not mapped (level shift 48)")."""
        if not any(n in self.k.symbols for n in ("init_top_pgt", "swapper_pg_dir")):
            return  # nothing to root at (a model kernel): the walker stays as it is
        via: list[PageWalker] = []
        with contextlib.suppress(VmshieldError):
            via = [PageWalker(self.k.walker.read_phys, c.cr3, c.la57) for c in self.t.cpus()]
        self.k.root_at_own_table(via)

    def allow_breakpoint(self, va: int) -> None:
        """An exit-engine breakpoint at ``va``: QEMU/KVM writes an ``int3`` there."""
        for r in self.regions:
            if r.code and r.va <= va < r.va + len(r.ref):
                bisect.insort(r.sites, ki.Site(va, 5, "kprobe"), key=lambda s: s.address)

    def _find_module(self, name: str) -> ModuleInfo:
        """The loaded module ``name``, the list walked again (translations flushed) if
        it is not found at first. Why: the reference is taken while the guest runs, and
        a walk that meets a node the guest is changing, or a translation cached from
        before, breaks early; the error then says what the walk saw."""
        k, seen = self.k, ""
        for attempt in range(MODULE_LOOKUPS):
            if attempt:
                time.sleep(RETRY_PAUSE * 4)
                k.walker.flush()
            found = modules(k)
            for m in found:
                if m.name == name and m.base:
                    return m
            seen = ", ".join(repr(m.name) if not m.error else f"<{m.error}>" for m in found)
        raise VmshieldError(
            f"kernel.text: no loaded module named {name!r} (the list, walked "
            f"{MODULE_LOOKUPS} times, holds: {seen[:1500] or 'nothing'})"
        )

    def _module_text(self, name: str, core_sites: list[ki.Site]) -> Region:
        k = self.k
        m = self._find_module(name)
        try:
            size = k.u32(m.address + k.member_offset("module", "core_layout.text_size"))
        except SymbolError:
            size = m.size  # 6.4+: mem[MOD_TEXT] is the text alone
        sites = core_sites + list(self._module_jump_sites(m.address))
        sites.sort(key=lambda s: s.address)
        text = k.read(m.base, size)
        sites = ki.sized_jump_sites(sites, text, m.base)
        return Region("kernel.text", name, m.base, text, True, sites)

    def _module_jump_sites(self, mod: int) -> list[ki.Site]:
        k = self.k
        try:
            entries = k.u64(mod + k.member_offset("module", "jump_entries"))
            n = k.u32(mod + k.member_offset("module", "num_jump_entries"))
        except SymbolError:
            return []
        if not entries or n > ki.MAX_ENTRIES:
            return []
        blob = k.read(entries, n * ki.JUMP_ENTRY_SIZE)
        return list(ki.jump_sites(ki.parse_jump_table(blob, entries)))

    def _sites(self) -> list[ki.Site]:
        """Every place the kernel may patch its text itself, sorted by address."""
        k = self.k
        sites: list[ki.Site] = []
        syms = k.symbols
        if "__start___jump_table" in syms and "__stop___jump_table" in syms:
            a, b = syms.address("__start___jump_table"), syms.address("__stop___jump_table")
            if 0 <= b - a <= ki.MAX_ENTRIES * ki.JUMP_ENTRY_SIZE:
                sites += ki.jump_sites(ki.parse_jump_table(k.read(a, b - a), a))
        else:  # kallsyms without the table's bounds: find it by structure in rodata
            ra, rb = syms.address("__start_rodata"), syms.address("__end_rodata")
            text = (syms.address("_stext"), syms.address("_etext"))
            found = ki.find_jump_table(k.read(ra, rb - ra), ra, text, (ra, 1 << 64))
            if found:
                sites += ki.jump_sites(ki.parse_jump_table(k.read(*found), found[0]))
        if "__start_static_call_sites" in syms and "__stop_static_call_sites" in syms:
            a = syms.address("__start_static_call_sites")
            b = syms.address("__stop_static_call_sites")
            if 0 <= b - a <= ki.MAX_ENTRIES * ki.STATIC_CALL_SITE_SIZE:
                for s in ki.parse_static_call_sites(k.read(a, b - a), a):
                    sites.append(ki.Site(s.addr, 5, "static_call"))
        for sym in syms:
            if sym.name.startswith("__SCT__"):  # static call trampolines
                sites.append(ki.Site(sym.address, 5, "static_call_tramp"))
        sites += self._ftrace_sites()
        # ftrace's own entry code calls the current tracer through patched call sites.
        for name in FTRACE_CALL_SITES:
            for sym in syms.all_named(name):
                sites.append(ki.Site(sym.address, 5, "static_call"))
        sites.sort(key=lambda s: s.address)
        return sites

    def _ftrace_sites(self) -> list[ki.Site]:
        """Every ftrace record (``ftrace_pages_start`` -> pages of ``dyn_ftrace``): the
        call sites ftrace turns between a nop and a call. The list changes under us (a
        module's pages are freed when it goes: a failed ``insmod`` too), so a walk that
        meets a freed page is tried again; after a few tries what was found is used."""
        out: list[ki.Site] = []
        for _ in range(FTRACE_TRIES):
            try:
                return self._ftrace_walk(out)
            except VmshieldError:
                self.k.walker.flush()
                time.sleep(0.1)
        return out

    def _ftrace_walk(self, out: list[ki.Site]) -> list[ki.Site]:
        out.clear()
        k = self.k
        if "ftrace_pages_start" not in k.symbols:
            return []
        off_next = k.member_offset("ftrace_page", "next")
        off_recs = k.member_offset("ftrace_page", "records")
        off_index = k.member_offset("ftrace_page", "index")
        size = k.sizeof("dyn_ftrace")
        page = k.u64(k.symbols.address("ftrace_pages_start"))
        seen: set[int] = set()
        while page and page not in seen and len(seen) < MAX_FTRACE_PAGES:
            seen.add(page)
            recs, n = k.u64(page + off_recs), k.u32(page + off_index)
            if recs and 0 < n <= MAX_FTRACE_RECORDS and len(out) + n <= MAX_FTRACE_RECORDS:
                blob = k.read(recs, n * size)
                for i in range(n):
                    ip = int.from_bytes(blob[i * size : i * size + 8], "little")
                    out.append(ki.Site(ip, 5, "ftrace"))
            page = k.u64(page + off_next)
        return out

    def _kprobe_sites(self) -> list[ki.Site]:
        """The kernel's registered kprobes (``kprobe_table``): an ``int3`` (or an
        optimized probe's ``jmp``) at each probed address is the kernel's own."""
        k = self.k
        if "kprobe_table" not in k.symbols:
            return []
        table = k.symbols.address("kprobe_table")
        off_addr = k.member_offset("kprobe", "addr")
        off_node = k.member_offset("kprobe", "hlist")
        out: list[ki.Site] = []
        for i in range(KPROBE_TABLE_SIZE):
            node = k.u64(table + 8 * i)
            seen: set[int] = set()
            while node and node not in seen and len(out) < MAX_KPROBES:
                seen.add(node)
                out.append(ki.Site(k.u64(node - off_node + off_addr), 5, "kprobe"))
                node = k.u64(node)
        return out

    # -- checking -----------------------------------------------------------------------

    def due(self) -> bool:
        return time.monotonic() >= self._next

    def tick(self, quiesce: Quiesce, force: bool = False) -> None:
        """Check everything if the interval has passed (or ``force``), else only the
        small tables (system call tables, IDT: a few KiB, read at every call: a hook
        there is the commonest rootkit move and costs nothing to see early). Never
        raises."""
        full = force or self.due()
        if full:
            self._next = time.monotonic() + self.interval
        t0 = time.thread_time()
        findings = self.check(light=not full)
        if full and self.probe is not None:
            findings += self._probe_all(quiesce)
        if full:
            self.stats.checks += 1
        for f in findings:
            self._act(f, quiesce)
        if full:  # the small tables again: a full check takes a while, the VM runs on
            for f in self.check(light=True):
                self._act(f, quiesce)
        self.stats.check_seconds += time.thread_time() - t0

    def check(self, light: bool = False) -> list[Finding]:
        """Every watched object once. Guest memory is hostile: a check that fails (a
        page unmapped, a list looping) is a finding about that object, and the others
        are still checked."""
        parts: list[tuple[str, Callable[[], list[Finding]]]] = [
            (r.object, functools.partial(self._check_region, r))
            for r in self.regions
            if r.entry or not light
        ]
        if light:
            return self._run(parts)
        if self.cpu_ref:
            obj = "cpu.control" if "cpu.control" in self.requests else "kernel.idt"
            parts.append((obj, self._check_cpus))
        if "kernel.modules" in self.requests:
            parts.append(("kernel.modules", self._check_modules))
        return self._run(parts)

    def _run(self, parts: list[tuple[str, Callable[[], list[Finding]]]]) -> list[Finding]:
        out: list[Finding] = []
        for obj, fn in parts:
            try:
                try:
                    out += fn()
                except VmshieldError:  # lists and trees change under a walk: once more
                    self.k.walker.flush()
                    time.sleep(RETRY_PAUSE)
                    out += fn()
            except Exception as e:  # hostile input must not end the monitor
                out.append(Finding(obj, "unreadable", f"{obj} check", 0, "readable",
                                   f"{type(e).__name__}: {e}"))  # fmt: skip
        return out

    def _check_region(self, r: Region) -> list[Finding]:
        out: list[Finding] = []
        for lo in range(0, len(r.ref), CHUNK):
            hi = min(lo + CHUNK, len(r.ref))
            try:
                now = self.k.read(r.va + lo, hi - lo)
            except VmshieldError as e:
                out.append(Finding(r.object, "unreadable", f"{r.name}+{lo:#x}", r.va + lo,
                                   "readable", str(e)))  # fmt: skip
                continue
            if now == r.ref[lo:hi]:
                continue
            if r.entry:
                out += self._entries(r, lo, now)
            else:
                out += self._bytes(r, lo, now)
        return out

    def _entries(self, r: Region, lo: int, now: bytes) -> list[Finding]:
        out = []
        w = r.entry
        for i in range(0, len(now) - w + 1, w):
            old, new = r.ref[lo + i : lo + i + w], now[i : i + w]
            if old == new:
                continue
            va = r.va + lo + i
            idx = (lo + i) // w
            if w == 16:  # an IDT gate: the handler address
                o, n = _gate_target(old), _gate_target(new)
            else:
                o, n = int.from_bytes(old, "little"), int.from_bytes(new, "little")
            out.append(Finding(
                r.object, "entry", f"{r.name}[{idx}]", va, f"{o:#x}", f"{n:#x}",
                restore=self._data_restore(va, old),
                extra={"old_symbol": self._sym(o), "new_symbol": self._sym(n),
                       "old_bytes": old.hex(), "new_bytes": new.hex(), "index": idx},
            ))  # fmt: skip
        return out

    def _bytes(self, r: Region, lo: int, now: bytes) -> list[Finding]:
        ref = r.ref[lo : lo + len(now)]
        if r.code:
            sites = r.sites
            kp = self._kprobe_sites()  # kprobes come and go: read them when text changed
            if kp:
                sites = sorted(sites + kp, key=lambda s: s.address)
            changes = ki.foreign_changes(ref, now, r.va + lo, sites, self._ftrace_call_ok)
            # Sites straddling the chunk's edges are explained with the whole region.
            changes = [c for c in changes if not self._edge_site(r, c, sites)]
        else:
            base = r.va + lo
            changes = [
                ki.Change(a, ref[a - base : a - base + n], now[a - base : a - base + n])
                for a, n in ki.diff_runs(ref, now, base)
            ]
        out = []
        for c in changes:
            out.append(Finding(
                r.object, "code" if r.code else "data", self._where(c.address), c.address,
                c.old.hex(), c.new.hex(),
                restore=self._code_restore(c.address, c.old) if r.code
                else self._data_restore(c.address, c.old),
                extra={"region": r.name, "length": len(c.new)},
            ))  # fmt: skip
        return out

    def _edge_site(self, r: Region, c: ki.Change, sites: list[ki.Site]) -> bool:
        """A change at a chunk edge that a site over the edge explains."""
        i = bisect.bisect_right([s.address for s in sites], c.address) - 1
        for s in sites[max(0, i - 1) : i + 1]:
            if s.address <= c.address < s.address + s.size:
                off = s.address - r.va
                if off < 0 or off + s.size > len(r.ref):
                    return False
                try:
                    now = self.k.read(s.address, s.size)
                except VmshieldError:
                    return False
                return ki.allowed_at(s, r.ref[off : off + s.size], now, self._ftrace_call_ok)
        return False

    def _ftrace_call_ok(self, target: int) -> bool:
        """What an ftrace site may call: ftrace's entry code in the core image, or a
        trampoline outside it (ftrace_ops and BPF trampolines live in the module area;
        which allocation owns one is not checked yet)."""
        if not self.k.extents[0].va <= target < self.k.symbols.address("_etext"):
            return True
        hit = self.k.symbols.lookup(target)
        return hit is not None and hit[0].name.startswith(("ftrace_", "__fentry__"))

    def _check_cpus(self) -> list[Finding]:
        out: list[Finding] = []
        try:
            cpus = self.t.cpus()
            self.t.qmp.close()  # QEMU serves one QMP client: release it between checks
        except VmshieldError as e:
            return [Finding("cpu.control", "unreadable", "info registers", 0, "", str(e))]
        for c in cpus:
            ref = self.cpu_ref.get(c.index)
            if ref is None:
                continue
            now = _cpu_values(c)
            if "cpu.control" in self.requests:
                out += self._control(c.index, ref, now)
            if "kernel.idt" in self.requests and now["idt_base"] != ref["idt_base"]:
                out.append(Finding(
                    "kernel.idt", "register", f"cpu {c.index} IDTR", 0,
                    f"{ref['idt_base']:#x}", f"{now['idt_base']:#x}", cpu=c.index,
                    task=self._current(c.index), extra={"register": "idtr"},
                ))  # fmt: skip
        return out

    def _probe_all(self, quiesce: Quiesce) -> list[Finding]:
        """Every vCPU's MSRs, with every vCPU stopped (the engine's quiesce)."""
        out: list[Finding] = []

        def probe(stub: GdbStub) -> None:
            for tid in stub.threads():
                out.extend(self._probe_msrs(stub, tid - 1))

        t0 = time.monotonic()
        try:
            quiesce(probe)
        except VmshieldError as e:  # our mechanism failed, not guest evidence: counted
            self.stats.probe_errors += 1
            self.stats.last_probe_error = f"{type(e).__name__}: {e}"
        self.stats.stopped_seconds += time.monotonic() - t0
        return out

    def _probe_msrs(self, stub: GdbStub, cpu: int) -> list[Finding]:
        """One vCPU's MSRs against the reference; with ``restore`` a change is written
        back at once, in the same stop (the vCPU may be halted at the next one)."""
        assert self.probe is not None
        try:
            now = self.probe.read(stub, cpu)
        except ProbeSkipped:
            return []
        except VmshieldError as e:  # our mechanism failed, not guest evidence: counted
            self.stats.probe_errors += 1
            self.stats.last_probe_error = f"{type(e).__name__}: {e}"
            return []
        ref = self.msr_ref.get(cpu)
        if ref is None:
            ref = dict(now)
            for name, sym in MSR_EXPECTED.items():
                if sym in self.k.symbols:
                    ref[name] = self.k.symbols.address(sym)
            self.msr_ref[cpu] = ref
        req = self.requests.get("cpu.msr")
        out = []
        for name, value in now.items():
            if value == ref[name]:
                continue
            restore: Callable[[Quiesce], None] | None = None
            if req is not None and req.action == "restore":
                try:
                    self.probe.write(stub, cpu, name, ref[name])
                    restore = _done
                except VmshieldError as e:
                    restore = _failed(e)
            out.append(Finding(
                "cpu.msr", "register", f"cpu {cpu} {name.upper()}", 0, f"{ref[name]:#x}",
                f"{value:#x}", cpu=cpu, task=self._current(cpu), restore=restore,
                extra={"register": name, "msr": f"{MSRS[name]:#x}",
                       "old_symbol": self._sym(ref[name]), "new_symbol": self._sym(value)},
            ))  # fmt: skip
        return out

    def at_stop(self, stub: GdbStub, regs: Any, cpu: int) -> None:
        """A cheap check while a vCPU is stopped at one of the exit engine's points (every
        vCPU stopped): the system call tables and the IDT, that vCPU's control registers
        (from the registers the hit already read) and its MSRs. At most once every
        :data:`STOP_CHECK_GAP` seconds; never raises. The stub is left with vCPU ``cpu``
        selected, as the engine had it."""
        now = time.monotonic()
        if now - self._last_stop < STOP_CHECK_GAP:
            return
        self._last_stop = now
        t0 = time.thread_time()
        findings = self.check(light=True)
        ref = self.cpu_ref.get(cpu)
        if ref is not None and "cpu.control" in self.requests:
            values = {"cr0": regs.cr0, "cr4": regs.cr4, "efer": regs.efer,
                      "idt_base": ref["idt_base"]}  # fmt: skip
            findings += self._control(cpu, ref, values)
        if self.probe is not None:
            findings += self._probe_msrs(stub, cpu)
        self.stats.stop_checks += 1
        self.stats.check_seconds += time.thread_time() - t0

        def here(fn: Callable[[GdbStub], None]) -> None:
            fn(stub)

        try:
            for f in findings:
                self._act(f, here)
        finally:
            if findings or self.probe is not None:
                with contextlib.suppress(VmshieldError):
                    stub.select_thread(cpu + 1)

    def _control(self, cpu: int, ref: dict[str, int], now: dict[str, int]) -> list[Finding]:
        """Protection bits set in the reference and clear now."""
        out = []
        for reg, bits in CONTROL_BITS.items():
            for name, bit in bits:
                if ref[reg] & bit and not now[reg] & bit:
                    out.append(Finding(
                        "cpu.control", "register", f"cpu {cpu} {reg.upper()}.{name}",
                        0, f"{ref[reg]:#x}", f"{now[reg]:#x}", cpu=cpu,
                        task=self._current(cpu),
                        restore=self._reg_restore(cpu, reg, now[reg] | bit),
                        extra={"register": reg, "bit": name},
                    ))  # fmt: skip
        return out

    def _check_modules(self) -> list[Finding]:
        """Cross-view: a module that other evidence in memory holds and the ``modules``
        list does not is hidden. The evidence: its sysfs kobject (``module_kset``) and
        the module tree (``mod_tree``: the latched rbtree the kernel looks addresses up
        in; a rootkit that unlinks from the list rarely rebalances that tree too).

        A module being loaded or unloaded is on the list and in the tree for a moment
        apart (and a failed load is taken off both in turn), so a module counts as
        hidden only when two checks in a row find it so: never a false alarm from a
        race, one interval later for a real one."""
        k = self.k
        k.walker.flush()  # modules come and go at reused addresses
        listed = {m.address for m in modules(k) if m.address}
        out: list[Finding] = []
        evidence: dict[int, list[str]] = {}
        for mod in self._kset_modules(out):
            evidence.setdefault(mod, []).append("sysfs (module_kset)")
        for mod in self._tree_modules(out):
            evidence.setdefault(mod, []).append("the module tree (mod_tree)")
        suspects = {m for m in evidence if m not in listed and m not in self.hidden_seen}
        confirmed = suspects & self.suspects
        if self.requests["kernel.modules"].filters.get("exec") == "on":
            out += self._exec_pages(listed | set(evidence))
        for mod in sorted(confirmed):
            name = k.cstring(mod + k.member_offset("module", "name"), 56)
            out.append(Finding(
                "kernel.modules", "hidden-module", f"module {name}", mod,
                "on the module list", "only in " + " and ".join(evidence[mod]),
                extra={"module": name, "evidence": evidence[mod]},
            ))  # fmt: skip
        # The state moves only once every read is done: a read that fails makes _run
        # walk again, and that walk must still be "the next check", not a second look
        # 50 ms later at suspects saved by the failed one (nor skip a confirmed module).
        self.suspects = suspects
        self.hidden_seen |= confirmed
        self.module_view = listed
        return out

    def _exec_pages(self, mods: set[int]) -> list[Finding]:
        """Executable memory in the module area that nothing the kernel keeps books on
        owns: a module hidden from every view (list, tree, sysfs), or code a rootkit
        allocated for itself. The owners: every module's memory, BPF images
        (``bpf_kallsyms``: programs, trampolines, dispatchers), kprobe instruction slot
        pages and ftrace trampolines. A page of int3 (or zero) throughout holds no code
        (the unused part of a BPF program pack or an executable-memory cache). Seen in
        two checks in a row, as hidden modules are (an allocation is made before its
        owner records it)."""
        k = self.k
        start = (k.symbols.address("_end") + HUGE - 1) & ~(HUGE - 1)
        pages: dict[int, int] = {}  # va -> pa, from this walk (no cached translation)
        for m in k.walker.mappings(start, MODULES_END, limit=MAX_EXEC_PAGES):
            if not m.nx:
                pages.update((m.va + o, m.pa + o) for o in range(0, m.size, ki.PAGE))
            if len(pages) > MAX_EXEC_PAGES:
                return [Finding("kernel.modules", "unreadable", "module area", start, "",
                                f"more than {MAX_EXEC_PAGES} executable pages")]  # fmt: skip
        owners = self._exec_owners(mods) + (self.own_memory() if self.own_memory else [])
        code: list[int] = []
        for va, n in ki.unowned_runs(pages, owners):
            if self._bpf_image(pages[va], n):
                continue
            for page in range(va, va + n * ki.PAGE, ki.PAGE):
                try:
                    if not ki.is_filler(self.t.mem.read(pages[page], ki.PAGE)):
                        code.append(page)
                except VmshieldError:
                    code.append(page)
        runs = {va: n for va, n in ki.unowned_runs(code, [])}
        suspects = {va for va in runs if va not in self.exec_seen}
        confirmed, self.exec_suspects = suspects & self.exec_suspects, suspects
        out = []
        for va in sorted(confirmed):
            self.exec_seen.add(va)
            try:
                head = k.read(va, 16).hex()
            except VmshieldError:
                head = ""
            out.append(Finding(
                "kernel.modules", "executable-allocation", f"{va:#x}", va,
                "no executable memory", f"{runs[va]} executable page(s) no module, BPF "
                "image, kprobe slot or ftrace trampoline owns",
                extra={"pages": runs[va], "first_bytes": head},
            ))  # fmt: skip
        return out

    def _exec_owners(self, mods: set[int]) -> list[tuple[int, int]]:
        """``[start, end)`` of every allocation the kernel knows as executable (or as a
        module's, whatever its permissions): see :meth:`_exec_pages`."""
        k = self.k
        owners: list[tuple[int, int]] = []
        for mod in mods:
            owners += self._module_memory(mod)
        if "bpf_kallsyms" in k.symbols:
            off_l = k.member_offset("bpf_ksym", "lnode")
            off_s, off_e = k.member_offset("bpf_ksym", "start"), k.member_offset("bpf_ksym", "end")
            head = k.symbols.address("bpf_kallsyms")
            for ks in walk_entries(k, head, off_l, MAX_KOBJECTS, "bpf_kallsyms")[0]:
                owners.append((k.u64(ks + off_s), k.u64(ks + off_e)))
        # BPF program packs (5.18+): 2 MiB each, filled with int3, shared by many JIT
        # images, the classic filters' included (which bpf_kallsyms does not list).
        for sym in k.symbols.all_named("pack_list"):
            for pack in walk_entries(k, sym.address, 0, MAX_KOBJECTS, "pack_list")[0]:
                ptr = k.u64(pack + 16)  # struct bpf_prog_pack: list (16 bytes), ptr, bitmap
                owners.append((ptr, ptr + HUGE))
        for cache in ("kprobe_insn_slots", "kprobe_optinsn_slots"):
            if cache in k.symbols:
                head = k.symbols.address(cache) + k.member_offset("kprobe_insn_cache", "pages")
                off_l = k.member_offset("kprobe_insn_page", "list")
                off_i = k.member_offset("kprobe_insn_page", "insns")
                for pg in walk_entries(k, head, off_l, MAX_KOBJECTS, cache)[0]:
                    insns = k.u64(pg + off_i)
                    owners.append((insns, insns + ki.PAGE))
        if "ftrace_ops_list" in k.symbols:
            end = k.symbols.address("ftrace_list_end") if "ftrace_list_end" in k.symbols else 0
            off_n = k.member_offset("ftrace_ops", "next")
            off_t = k.member_offset("ftrace_ops", "trampoline")
            off_z = k.member_offset("ftrace_ops", "trampoline_size")
            ops = k.u64(k.symbols.address("ftrace_ops_list"))
            seen: set[int] = set()
            while ops and ops != end and ops not in seen and len(seen) < MAX_KOBJECTS:
                seen.add(ops)
                tramp = k.u64(ops + off_t)
                if tramp:
                    owners.append((tramp, tramp + k.u32(ops + off_z)))
                ops = k.u64(ops + off_n)
        return owners

    def _bpf_image(self, pa: int, n: int) -> bool:
        """A JIT image of a classic BPF filter before 5.18 (a DHCP client's socket
        filter): the kernel keeps no list of those, so it is recognised by its header
        (``struct bpf_binary_header``: its page count first, the allocation filled with
        int3 around the code). A limit: a foreign allocation shaped like one passes."""
        try:
            head = self.t.mem.read(pa, 20)
            return int.from_bytes(head[:4], "little") == n and head[4:] == b"\xcc" * 16
        except VmshieldError:
            return False

    def _module_memory(self, mod: int) -> list[tuple[int, int]]:
        """A module's memory: its layouts (up to 6.3) or its memory areas (6.4+)."""
        k = self.k
        out = []
        try:
            mem, size = k.member_offset("module", "mem"), k.sizeof("module_memory")
            off_b = k.member_offset("module_memory", "base")
            off_z = k.member_offset("module_memory", "size")
            for i in range(MOD_MEM_TYPES):
                base = k.u64(mod + mem + i * size + off_b)
                if base:
                    out.append((base, base + k.u32(mod + mem + i * size + off_z)))
        except SymbolError:
            for layout in ("core_layout", "init_layout"):
                base = k.u64(mod + k.member_offset("module", f"{layout}.base"))
                if base:
                    out.append(
                        (base, base + k.u32(mod + k.member_offset("module", f"{layout}.size")))
                    )
        return out

    def _kset_modules(self, out: list[Finding]) -> set[int]:
        k = self.k
        kset = k.u64(k.symbols.address("module_kset"))
        off_entry = k.member_offset("kobject", "entry")
        off_list = k.member_offset("kset", "list")
        off_kobj = k.member_offset("module_kobject", "kobj")
        off_mod = k.member_offset("module_kobject", "mod")
        kobjs, broken = walk_entries(k, kset + off_list, off_entry, MAX_KOBJECTS, "module kset")
        if broken:
            out.append(Finding("kernel.modules", "unreadable", "module_kset", kset, "", broken))
        return {m for kobj in kobjs if (m := k.u64(kobj - off_kobj + off_mod))}

    def _tree_modules(self, out: list[Finding]) -> set[int]:
        """Modules in ``mod_tree`` (its first latch copy, ``tree[0]``; each node is a
        ``mod_tree_node`` of one of a module's memory areas, holding the module)."""
        k = self.k
        if "mod_tree" not in k.symbols:
            return set()
        root = (k.symbols.address("mod_tree") + k.member_offset("mod_tree_root", "root")
                + k.member_offset("latch_tree_root", "tree"))  # fmt: skip
        off_node = k.member_offset("mod_tree_node", "node")  # latch_tree_node.node[0]
        off_mod = k.member_offset("mod_tree_node", "mod")
        nodes, broken = ki.walk_rbtree(k.u64, k.u64(root))
        if broken:
            out.append(Finding("kernel.modules", "unreadable", "mod_tree", root, "", broken))
            return set()  # a partial tree proves nothing about what is missing
        return {m for n in nodes if (m := k.u64(n - off_node + off_mod))}

    # -- restoring and reporting --------------------------------------------------------

    def _data_restore(self, va: int, old: bytes) -> Callable[[Quiesce], None]:
        def put(_q: Quiesce) -> None:
            done = 0
            while done < len(old):
                at = va + done
                n = min(len(old) - done, 0x1000 - (at & 0xFFF))
                self.t.mem.write(self.k.walker.translate(at), old[done : done + n])
                done += n

        return put

    def _code_restore(self, va: int, old: bytes) -> Callable[[Quiesce], None]:
        def put(q: Quiesce) -> None:
            q(lambda stub: stub.write_memory(va, old))

        return put

    def _reg_restore(self, cpu: int, reg: str, value: int) -> Callable[[Quiesce], None]:
        def put(q: Quiesce) -> None:
            def write(stub: GdbStub) -> None:
                stub.select_thread(cpu + 1)
                stub.write_register(reg, value)

            q(write)

        return put

    def _act(self, f: Finding, quiesce: Quiesce) -> None:
        req = self.requests.get(f.object)
        if req is None:
            return
        place = (f.where, f.address)
        action = req.action
        response = "reported"
        detail: dict[str, Any] = {}
        if action == "restore" and f.restore is not None:
            try:
                f.restore(quiesce)
                self.restores[place] = self.restores.get(place, 0) + 1
                self.stats.restored += 1
                response = "restored"
            except ProbeSkipped:
                return  # the vCPU cannot take it now: seen and tried again next check
            except VmshieldError as e:
                response = f"restore failed: {e}"
        elif self.reported.get(place) == f.new:
            return  # a change left in place is reported once
        self.reported[place] = f.new
        if action == "pause":
            pause_vm(self.t)
            response = "paused"
        elif action == "dump" and self.dumps is not None:
            detail = self.dumps.dump(self.t, req.id)
        self.stats.findings += 1
        fields = {"what": f.what, "where": f.where, "address": f"{f.address:#x}",
                  "old": f.old, "new": f.new, "response": response,
                  "count": self.restores.get(place, 0), **f.extra}  # fmt: skip
        if f.cpu is not None:
            fields["cpu"] = f.cpu
        # The task on the vCPU when the change was seen: a hint, not proof of who made it
        # (a check every interval sees the change after the fact), so not ``process``.
        cur = self._process(f.task)
        if cur is not None:
            fields["current"] = {"pid": cur.pid, "comm": cur.comm, "task": cur.task}
        self.emit(Event(
            time=time.time(), vm=self.t.name, request=req.id, object=f.object, action=action,
            process=None, fields=fields,
            point=PointInfo(symbol=f.where, address=f"{f.address:#x}", kind="integrity-check",
                            engine=self.engine, cpu=f.cpu or 0),
            detail=detail,
        ))  # fmt: skip

    def space_alert(self, ev: Event) -> None:
        """A ``space.integrity`` alert of the security space, as an event of the
        ``space.self`` request (its id and action; the space's ``--on-tamper`` policy
        decides what is done, so ``response`` says that). An alert about a system call
        table or the IDT is also an event of the requested table object: the space
        watches those for itself and may see a change (and put it back) before this
        checker does."""
        if ev.fields.get("what") == "kernel-table":
            self._space_table(ev)
        req = self.requests.get("space.self")
        if req is None:
            return
        self.stats.findings += 1
        self.emit(Event(
            time=ev.time, vm=ev.vm, request=req.id, object="space.self", action=req.action,
            process=None, fields={**ev.fields, "response": "as --on-tamper"},
            point=PointInfo(symbol=ev.point.symbol, address=ev.point.address,
                            kind="integrity-check", engine=self.engine, cpu=ev.point.cpu),
        ))  # fmt: skip

    def _space_table(self, ev: Event) -> None:
        try:
            va = int(str(ev.fields.get("address", "0")), 16)
        except ValueError:
            return
        for r in self.regions:
            if not (r.entry and r.va <= va < r.va + len(r.ref)) or r.object not in self.requests:
                continue
            req = self.requests[r.object]
            idx = (va - r.va) // r.entry
            old = r.ref[idx * r.entry : (idx + 1) * r.entry]
            try:
                new = self.k.read(r.va + idx * r.entry, r.entry)
            except VmshieldError:
                new = old
            o = _gate_target(old) if r.entry == 16 else int.from_bytes(old, "little")
            if new == old:  # put back already: the alert's bytes say what was there
                raw = bytearray(old)
                try:
                    found = bytes.fromhex(str(ev.fields.get("found", "")))
                except ValueError:
                    found = b""
                off = va - (r.va + idx * r.entry)
                for j, b in enumerate(found[: r.entry - off]):
                    raw[off + j] = b
                new = bytes(raw)
            n = _gate_target(new) if r.entry == 16 else int.from_bytes(new, "little")
            place = (f"{r.name}[{idx}]", r.va + idx * r.entry)
            rearmed = ev.fields.get("response") == "rearm"
            if rearmed:
                self.restores[place] = self.restores.get(place, 0) + 1
                self.stats.restored += 1
            self.stats.findings += 1
            self.emit(Event(
                time=ev.time, vm=ev.vm, request=req.id, object=r.object, action=req.action,
                process=None,
                fields={"what": "entry", "where": place[0], "address": f"{place[1]:#x}",
                        "old": f"{o:#x}", "new": f"{n:#x}", "old_symbol": self._sym(o),
                        "new_symbol": self._sym(n), "index": idx,
                        "response": "restored" if rearmed else "reported",
                        "by": "security space", "count": self.restores.get(place, 0)},
                point=PointInfo(symbol=place[0], address=f"{place[1]:#x}",
                                kind="integrity-check", engine=self.engine, cpu=0),
            ))  # fmt: skip
            return

    def _process(self, task: int | None) -> ProcessContext | None:
        if not task:
            return None
        try:
            ti = self._tasks.info(task)
        except VmshieldError:
            return None
        return ProcessContext(pid=ti.pid, tgid=ti.tgid, ppid=ti.ppid, uid=ti.uid, euid=ti.euid,
                              gid=ti.gid, comm=ti.comm, task=f"{task:#x}")  # fmt: skip

    def _current(self, cpu: int) -> int | None:
        try:
            return current_task(self.k, cpu)
        except VmshieldError:
            return None

    def _sym(self, va: int) -> str:
        hit = self.k.symbols.lookup(va)
        if hit is None:
            return ""
        sym, off = hit
        return f"{sym.name}+{off:#x}" if off else sym.name

    def _where(self, va: int) -> str:
        return self._sym(va) or f"{va:#x}"


def _cpu_values(c: CpuState) -> dict[str, int]:
    return {"cr0": c.cr0, "cr4": c.cr4, "efer": c.efer, "idt_base": c.idt_base}


def _gate_target(gate: bytes) -> int:
    """The handler address of a 64-bit IDT gate descriptor."""
    lo = int.from_bytes(gate[0:2], "little")
    mid = int.from_bytes(gate[6:8], "little")
    hi = int.from_bytes(gate[8:12], "little")
    return lo | mid << 16 | hi << 32


def _done(_q: Quiesce) -> None:
    """A restore already made where the change was found (the MSR probe's stop)."""


def _failed(e: VmshieldError) -> Callable[[Quiesce], None]:
    def fail(_q: Quiesce) -> None:
        raise e

    return fail
