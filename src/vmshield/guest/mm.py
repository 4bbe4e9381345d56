"""Address spaces of guest processes (``struct mm_struct``)."""

from __future__ import annotations

from vmshield.guest.kernel import Kernel
from vmshield.guest.paging import PageWalker


def mm_walker(k: Kernel, mm: int) -> PageWalker:
    """A page walker over a process's address space (``struct mm_struct *``): its
    ``pgd`` is a kernel virtual address, translated to the physical root here."""
    pgd = k.u64(mm + k.member_offset("mm_struct", "pgd"))
    return PageWalker(k.walker.read_phys, k.walker.translate(pgd), len(k.walker.levels) == 5)
