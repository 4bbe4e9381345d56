"""Walking the kernel's circular doubly linked lists (``struct list_head``) safely.

The lists live in guest memory: a forged ``next`` pointer can make a cycle that never
returns to the head, or a list of millions of entries. Every walk here is bounded and
cycle-checked, and says which list misbehaved.
"""

from __future__ import annotations

from vmshield.errors import GuestFormatError, MemoryAccessError, TranslationError
from vmshield.guest.kernel import Kernel


def list_entries(k: Kernel, head: int, member_offset: int, limit: int, what: str) -> list[int]:
    """The containing structures of every node on the list at ``head`` (head excluded):
    ``container_of(node, T, member)`` for each ``node`` in ``head->next ...``."""
    return _walk(k, head, member_offset, limit, what, partial=False)[0]


def walk_entries(
    k: Kernel, head: int, member_offset: int, limit: int, what: str
) -> tuple[list[int], str | None]:
    """Like :func:`list_entries`, but a link that cannot be read (the guest unmapped or
    corrupted a node) ends the walk with what was found so far and says why, instead of
    losing the whole list: ``(entries, None)`` or ``(entries up to the break, reason)``.
    A loop or an over-long list is still an error: its entries cannot be trusted."""
    return _walk(k, head, member_offset, limit, what, partial=True)


def _walk(
    k: Kernel, head: int, member_offset: int, limit: int, what: str, partial: bool
) -> tuple[list[int], str | None]:
    """The bounded, cycle-checked walk; an unreadable link raises unless ``partial``."""
    seen = {head}
    out: list[int] = []
    at = head
    while True:
        try:
            cur = k.u64(at)
        except (TranslationError, MemoryAccessError) as e:
            if not partial:
                raise
            where = f"head {head:#x}" if at == head else f"link at {at:#x}"
            return out, f"{what} list {where} is unreadable: {e}"
        if cur == head:
            return out, None
        if cur in seen:
            raise GuestFormatError(f"{what} list loops back to {cur:#x}")
        if len(out) >= limit:
            raise GuestFormatError(f"{what} list is longer than {limit}")
        seen.add(cur)
        out.append(cur - member_offset)
        at = cur
