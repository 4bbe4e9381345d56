"""Monitoring points on kernel functions, placed on the function's ftrace NOP.

Why the NOP: a breakpoint on the 5-byte ``nopl 0x0(%rax,%rax,1)`` that ftrace leaves at
each traceable function's entry can be resumed by ``rip += 5`` and one continue: no
single step, no breakpoint toggling (each toggle makes TCG retranslate). The NOP is at
+0, or at +4 after ``endbr64`` or a sealed endbr on IBT kernels: objtool/apply_seal_endbr
overwrite the ``endbr64`` of functions never called indirectly with a 4-byte NOP, whose
form changed between releases (``66 0f 1f 00`` on 6.12, ``0f 1f 40 d6`` on 7.3), so any
4-byte NOP there counts. The prologue is decoded (capstone) rather than assumed.
"""

from __future__ import annotations

from dataclasses import dataclass

import capstone

from vmshield.errors import SymbolError, VmshieldError
from vmshield.guest.kernel import Kernel

ENDBR64 = bytes.fromhex("f30f1efa")  # IBT landing pad (6.12)
SEALED_ENDBR = bytes.fromhex("660f1f00")  # 6.12's seal; 7.3 writes 0f 1f 40 d6


def _is_landing_pad(insn: capstone.CsInsn) -> bool:
    """``endbr64`` or a 4-byte NOP that replaced one (a sealed endbr, any release)."""
    return bytes(insn.bytes) == ENDBR64 or (insn.mnemonic == "nop" and insn.size == 4)


_cs = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)


@dataclass(frozen=True)
class MonitoringPoint:
    symbol: str
    function: int  # the function's address
    address: int  # where the breakpoint goes
    resume: int  # where execution continues after a hit (past the NOP), or the same
    on_nop: bool


def place_point(kernel: Kernel, symbol: str) -> MonitoringPoint:
    fn = kernel.symbols.address(symbol)
    code = kernel.read(fn, 16)
    insns = list(_cs.disasm(code, fn, 3))
    if not insns:
        raise SymbolError(f"cannot decode the entry of {symbol}")
    first = insns[0]
    nop = first
    if _is_landing_pad(first) and len(insns) > 1:
        nop = insns[1]
    # The boot-time NOP differs by CPU: 0f 1f 44 00 00 (P6) or 66 66 66 66 90 (K8, seen
    # on 5.10 under TCG). Any one-instruction 5-byte NOP is a patch site.
    if nop.mnemonic == "nop" and nop.size == 5:
        return MonitoringPoint(symbol, fn, nop.address, nop.address + 5, True)
    at = code[nop.address - fn : nop.address - fn + 5]
    # A live ftrace user may have turned the NOP into a call: do not stack on it.
    raise SymbolError(
        f"{symbol} has no ftrace NOP at its entry (found {at.hex()}); is another tracer using it?"
    )


# dyn_ftrace.flags bits (their values differ between releases: read from BTF).
FTRACE_FLAGS = (
    "FTRACE_FL_ENABLED", "FTRACE_FL_REGS", "FTRACE_FL_REGS_EN", "FTRACE_FL_TRAMP",
    "FTRACE_FL_TRAMP_EN", "FTRACE_FL_IPMODIFY", "FTRACE_FL_DISABLED", "FTRACE_FL_DIRECT",
    "FTRACE_FL_DIRECT_EN", "FTRACE_FL_CALL_OPS", "FTRACE_FL_CALL_OPS_EN", "FTRACE_FL_TOUCHED",
    "FTRACE_FL_MODIFIED",
)  # fmt: skip
MAX_FTRACE_PAGES = 20000
MAX_FTRACE_RECORDS = 200000


def ftrace_count_mask(k: Kernel) -> int:
    """The use-count bits of ``dyn_ftrace.flags``: below the lowest FTRACE_FL_* flag
    (23 bits on 5.10/6.1, 19 on 6.12, which added TOUCHED and MODIFIED)."""
    low = 1 << 31
    for name in FTRACE_FLAGS:
        try:
            v = k.btf.enum_value(None, name) & 0xFFFFFFFF
        except VmshieldError:
            continue
        if v:
            low = min(low, v)
    return low - 1


def ftrace_record(k: Kernel, ip: int) -> int | None:
    """``struct dyn_ftrace *`` for ``ip`` (bounded walk of ``ftrace_pages_start``, a
    binary search in each page's sorted records)."""
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


def ftrace_users(k: Kernel) -> bool:
    """Whether any ftrace_ops is registered in the guest (tracer, kprobe, BPF...)."""
    if "ftrace_ops_list" not in k.symbols or "ftrace_list_end" not in k.symbols:
        return True  # cannot tell: the safe answer
    return k.u64(k.symbols.address("ftrace_ops_list")) != k.symbols.address("ftrace_list_end")
