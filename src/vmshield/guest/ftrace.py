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

from vmshield.errors import SymbolError
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
