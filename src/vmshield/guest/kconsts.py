"""Constants the kernel compiled into its code (``#define``s BTF does not carry), read
from the code itself.

Why: thread-info flag numbers are preprocessor constants, so neither kallsyms nor BTF
has them, and they changed: x86 had ``TIF_SIGPENDING`` = 2 up to 6.x; 7.3 uses the
generic TIF layout where it is 1. Setting the wrong bit for the ``kill`` action flags
something else (``TIF_NOTIFY_SIGNAL``) and the task never dies. The kernel's own
``signal_wake_up_state(t, state)`` starts with ``set_tsk_thread_flag(t, TIF_SIGPENDING)``,
one (locked) read-modify-write on ``t``'s first word (``thread_info.flags``; the task
pointer is the first argument, ``rdi``): decoding it gives the bit this build uses.
"""

from __future__ import annotations

import capstone
from capstone import x86

from vmshield.errors import GuestFormatError
from vmshield.guest.kernel import Kernel

_cs = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
_cs.detail = True
_MAX_INSNS = 24  # the flag is set within the first few instructions


def tif_bit_from_code(code: bytes, address: int) -> int | None:
    """The bit an ``or``/``bts`` on ``[rdi]`` sets in ``code`` (the prologue of
    ``signal_wake_up_state``), before any call or branch; None if there is none."""
    for insn in _cs.disasm(code, address, _MAX_INSNS):
        if insn.mnemonic in ("call", "ret", "jmp") or insn.mnemonic.startswith("j"):
            if insn.mnemonic == "call" and insn.address == address + 4:
                continue  # the ftrace call/NOP after endbr64
            if insn.mnemonic == "call" and insn.address == address:
                continue
            return None
        ops = insn.operands
        if len(ops) != 2 or ops[0].type != x86.X86_OP_MEM or ops[1].type != x86.X86_OP_IMM:
            continue
        mem = ops[0].mem
        if mem.base != x86.X86_REG_RDI or mem.index != 0 or mem.disp != 0:
            continue
        # No check of the lock prefix: on one CPU the kernel's alternatives turn it into
        # a DS prefix (smp_locks), and the running code is what is read.
        imm = int(ops[1].imm)
        op = insn.mnemonic.split()[-1]  # capstone spells it "lock or"
        if op == "or" and imm > 0 and imm & (imm - 1) == 0:
            return imm.bit_length() - 1
        if op == "bts" and 0 <= imm < 64:
            return imm
    return None


def tif_sigpending_bit(k: Kernel) -> int:
    """``TIF_SIGPENDING`` of this kernel, from ``signal_wake_up_state``'s code."""
    fn = k.symbols.address("signal_wake_up_state")
    bit = tif_bit_from_code(k.read(fn, 64), fn)
    if bit is None:
        raise GuestFormatError(
            "cannot read TIF_SIGPENDING from signal_wake_up_state (no or/bts on the "
            "task's flags in its first instructions)"
        )
    return bit
