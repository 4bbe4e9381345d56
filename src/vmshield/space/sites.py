"""Monitoring sites: a point's ftrace NOP turned into ``call vms_gate`` and back, with
the function's ftrace record marked DISABLED meanwhile so that the guest's ftrace never
tries to rewrite our call (it would find unexpected bytes and shut ftrace down).
"""

from __future__ import annotations

from vmshield.guest.ftrace import ftrace_count_mask, ftrace_record, ftrace_users
from vmshield.hv.gdbstub import GdbStub
from vmshield.space import layout as L
from vmshield.space.base import SiteState
from vmshield.space.errors import SpaceBusy, SpaceError
from vmshield.space.integrity import CheckedSpace

NOPS5 = (bytes.fromhex("0f1f440000"), bytes.fromhex("6666666690"))


class PatchedSpace(CheckedSpace):
    """Adding, patching and unpatching sites."""

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
        rec = ftrace_record(self.k, address)
        flags = self.k.u32(rec + 8) if rec else 0
        disabled = self.k.btf.enum_value(None, "FTRACE_FL_DISABLED")
        if flags & (1 << 31 | ftrace_count_mask(self.k)) or flags & disabled:
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
                if ftrace_users(self.k):
                    # ftrace skipped this record while it was DISABLED, so its use count
                    # misses the tracers registered meanwhile; clearing the flag now would
                    # let their removal underflow the count (a WARN, then ftrace shuts
                    # down). Leave it: the function stays untraceable until reboot.
                    self.left_disabled.append(s.symbol)
                else:
                    self._write_data(s.ftrace_flags_va, s.ftrace_flags_before.to_bytes(4, "little"))
            s.live = False
        self.save_state()

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
