"""The security space's own integrity: what the guest holds now against what vmshield
wrote (agent code, config, sites, ftrace flags, protected pages, kernel tables, CPU
state samples), and the repair that writes our bytes back.
"""

from __future__ import annotations

import ctypes as C

from vmshield.errors import VmshieldError
from vmshield.space import layout as L
from vmshield.space.alert import Alert
from vmshield.space.base import PAGE, sha
from vmshield.space.borrow import Borrow
from vmshield.space.draining import DrainedSpace

# CR4 bits the kernel flips per task on context switch: TSD (prctl PR_SET_TSC), PCE (rdpmc).
CR4_PER_TASK = (1 << 2) | (1 << 8)


CPU_FIELDS = ("cr0", "cr4", "efer", "star", "lstar", "sysenter_eip", "idt_base",
              "idt_limit", "gdt_base", "gdt_limit")  # fmt: skip


class CheckedSpace(DrainedSpace):
    """Integrity checks and repair."""

    def _rehash(self) -> None:
        r = self.region
        assert r is not None
        self._hashes = {"agent-code": sha(self._image_bytes), "config": sha(bytes(self.config))}

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
        if sha(code) != self._hashes["agent-code"]:
            at = next(i for i, (a, b) in enumerate(zip(code, self._image_bytes, strict=True))
                      if a != b)  # fmt: skip
            want, got = self._image_bytes[at : at + 8].hex(), code[at : at + 8].hex()
            alerts.append(Alert("agent-code", "security space text", r.base + at, want, got))
        conf = self._read(r.config_va, C.sizeof(L.Config))
        if sha(conf) != self._hashes["config"]:
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
