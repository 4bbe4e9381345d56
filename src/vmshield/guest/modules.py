"""Loaded kernel modules, walked from the ``modules`` list (``struct module *``).

Module memory moved between versions: ``core_layout`` (5.10, 6.1) became the ``mem[]``
array of ``struct module_memory`` (6.4+). Both are resolved through BTF.

The list is guest memory: a module that cannot be read is listed with ``error`` set and
the walk goes on; a list broken part-way ends with an entry saying where.
"""

from __future__ import annotations

from dataclasses import dataclass

from vmshield.errors import SymbolError, VmshieldError
from vmshield.guest.kernel import Kernel
from vmshield.guest.lists import walk_entries

MAX_MODULES = 4096
MODULE_NAME_LEN = 56
STATES = {0: "live", 1: "coming", 2: "going", 3: "unformed"}


@dataclass(frozen=True)
class ModuleInfo:
    address: int  # struct module *
    name: str
    state: str
    base: int  # core (text) base
    size: int
    error: str = ""  # set when the module (or the list at it) could not be read


def modules(k: Kernel) -> list[ModuleInfo]:
    """Every module on the kernel's ``modules`` list, in list order (as /proc/modules)."""
    off_list = k.member_offset("module", "list")
    off_name = k.member_offset("module", "name")
    off_state = k.member_offset("module", "state")
    try:
        off_base = k.member_offset("module", "core_layout.base")
        off_size = k.member_offset("module", "core_layout.size")
    except SymbolError:
        mem = k.member_offset("module", "mem")  # mem[MOD_TEXT], MOD_TEXT == 0
        off_base = mem + k.member_offset("module_memory", "base")
        off_size = mem + k.member_offset("module_memory", "size")
    out: list[ModuleInfo] = []
    found, broken = walk_entries(k, k.symbols.address("modules"), off_list, MAX_MODULES, "module")
    for mod in found:
        try:
            raw = k.read(mod + off_name, MODULE_NAME_LEN)
            name = raw.split(b"\0", 1)[0].decode("utf-8", errors="backslashreplace")
            state = k.u32(mod + off_state)
            out.append(
                ModuleInfo(
                    mod,
                    name,
                    STATES.get(state, str(state)),
                    k.u64(mod + off_base),
                    k.u32(mod + off_size),
                )
            )
        except VmshieldError as e:
            out.append(ModuleInfo(mod, "?", "unreadable", 0, 0, str(e)))
    if broken:
        out.append(ModuleInfo(0, "?", "unreadable", 0, 0, broken))
    return out
