"""The region's life: allocated, written and protected in the guest (build), taken
over from an earlier session (adopt), scrubbed and freed (destroy); each step recorded
in the state file first.
"""

from __future__ import annotations

import contextlib
import ctypes as C
import time

from vmshield.errors import VmshieldError
from vmshield.guest.kconsts import tif_sigpending_bit
from vmshield.guest.tasks import current_task_offset
from vmshield.hv.gdbstub import GdbStub
from vmshield.space import agent as agentlib
from vmshield.space import layout as L
from vmshield.space.base import PAGE, Region, pages
from vmshield.space.borrow import Borrow
from vmshield.space.errors import SpaceBusy, SpaceError, StaleSpace
from vmshield.space.sites import PatchedSpace

SAMPLE_INTERVAL_NS = 200_000_000


def ring_size_for(ram_bytes: int, ncpus: int) -> int:
    """Bytes of records per vCPU by default: all rings together take at most 1/32 of
    guest RAM (the allocation is GFP_KERNEL: it must not push a small guest into its OOM
    killer), at most 16 MiB a ring, a power of two (16 MiB per vCPU for 512 MiB and one
    vCPU: 131,072 getpid records, four bursts of 30,000 calls even if the host read
    nothing meanwhile)."""
    fit = ram_bytes // 32 // max(1, ncpus)
    return max(L.RING_MIN, min(16 << 20, 1 << max(0, fit.bit_length() - 1)))


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


class RegionLifecycle(PatchedSpace):
    """Build, adopt and destroy the region."""

    def build(self, b: Borrow, ncpus: int, ring_size: int | None = None) -> None:
        """Allocate, write and protect the agent (a task must be parked in ``b``).
        ``ring_size``: bytes of records per vCPU (default: sized from guest RAM)."""
        k = self.k
        obj = agentlib.build().read_bytes()
        # Link once at a stand-in module address to learn the size; then at the real base.
        stand_in = 0xFFFFFFFFC0000000
        probe = agentlib.link(obj, stand_in, stand_in + (1 << 24), lambda s: stand_in)
        text_pages = pages(len(probe.code))
        config_pages = pages(C.sizeof(L.Config))
        ram = sum(size for _, size in self.t.mem.ranges())
        size = L.check_ring_size(ring_size) if ring_size else ring_size_for(ram, ncpus)
        region = Region(0, text_pages, config_pages, L.ring_bytes(size), ncpus, size)
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

    def sync_time(self, b: Borrow) -> None:
        """Map the guest's monotonic clock to host time (it stops while the VM does, so
        this is redone whenever vmshield has the guest parked anyway)."""
        ns = b.call("ktime_get_mono_fast_ns")
        self.time_base = (ns, time.time())

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
        c.ring_size = r.ring_size
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
