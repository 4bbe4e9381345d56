"""Monitoring points on kernel functions, placed on the function's ftrace NOP.

Why the NOP: a breakpoint on the 5-byte ``nopl 0x0(%rax,%rax,1)`` that ftrace leaves at
each traceable function's entry can be resumed by ``rip += 5`` and one continue: no
single step, no breakpoint toggling (each toggle makes TCG retranslate). The NOP is at
+0, or at +4 after ``endbr64`` or a sealed endbr (``nopl (%rax)``) on IBT kernels; the
prologue is decoded (capstone) rather than assumed.
"""

from __future__ import annotations

from dataclasses import dataclass

import capstone

from vmshield.errors import SymbolError
from vmshield.guest.kernel import Kernel

FTRACE_NOP = bytes.fromhex("0f1f440000")
ENDBR64 = bytes.fromhex("f30f1efa")
SEALED_ENDBR = bytes.fromhex("660f1f00")

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
    offset = 0
    if bytes(first.bytes) in (ENDBR64, SEALED_ENDBR):
        offset = first.size
    at = code[offset : offset + 5]
    if at == FTRACE_NOP:
        return MonitoringPoint(symbol, fn, fn + offset, fn + offset + 5, True)
    # A live ftrace user may have turned the NOP into a call: do not stack on it.
    raise SymbolError(
        f"{symbol} has no ftrace NOP at its entry (found {at.hex()}); is another tracer using it?"
    )
