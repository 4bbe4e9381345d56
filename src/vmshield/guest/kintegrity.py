"""The kernel's own patch tables, parsed pure: where the kernel itself rewrites its text,
and which bytes it may leave there.

Why: a checker that compares kernel text with a reference taken after boot sees every
byte the kernel changes on purpose (static keys flipping a jump label, ftrace turning a
``nop`` into a ``call``, a static call retargeted, a kprobe's ``int3``). Those must not
be alarms, and a foreign write must not hide among them. The kernel keeps the list of
its own patch sites in tables it needs to patch at all (``__jump_table``,
``__start_static_call_sites``, the ftrace records, the kprobe table); a changed byte is
the kernel's own only when it lies in such a site *and* the site holds one of the few
instructions that site may hold (the nop of its size, or a branch to its own target).

Everything here takes bytes and numbers and returns data: nothing reads the guest, so
it is tested on the cached real vmlinux images and with generated malformed input. The
guest's tables are hostile input: every loop is bounded and every entry checked.
"""

from __future__ import annotations

import bisect
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from vmshield.errors import VmshieldError

JUMP_ENTRY_SIZE = 16
"""``struct jump_entry`` on x86-64: ``s32 code; s32 target; long key`` (each relative to
its own field's address since 4.15)."""

STATIC_CALL_SITE_SIZE = 8
"""``struct static_call_site``: ``s32 addr; s32 key`` (relative, low key bits flags)."""

MAX_ENTRIES = 1 << 20
"""No kernel has a million patch sites; a larger table is a forged length."""

NOPS: dict[int, frozenset[bytes]] = {
    2: frozenset({bytes.fromhex("6690"), bytes.fromhex("eb00")}),
    5: frozenset(
        {
            bytes.fromhex("0f1f440000"),  # x86_64 ideal nop5 (BYTES_NOP5)
            bytes.fromhex("3e8d742600"),  # 32-bit-era nop5 some kernels still emit
            bytes.fromhex("6666669090"),
            bytes.fromhex("6666906690"),
        }
    ),
}
"""The nops the kernel writes at its 2- and 5-byte patch sites (``x86_nops``)."""

INT3 = 0xCC
JMP8, JMP32, CALL32, RET = 0xEB, 0xE9, 0xE8, 0xC3


@dataclass(frozen=True)
class JumpEntry:
    """One jump label site: the instruction at ``code`` is a nop or ``jmp target``."""

    code: int
    target: int
    key: int  # the static_key (flag bits cleared)
    branch: bool  # JUMP_TYPE_TRUE: the default is the jump


@dataclass(frozen=True)
class StaticCallSite:
    """One static call site: a ``call``/``jmp rel32`` to the current function, or a nop."""

    addr: int
    key: int
    tail: bool  # STATIC_CALL_SITE_TAIL: a jmp, not a call


@dataclass(frozen=True)
class Site:
    """A patch site the kernel may rewrite: ``size`` bytes at ``address`` (``kind``:
    ``jump_label``, ``static_call``, ``ftrace``, ``kprobe``, ``static_call_tramp``)."""

    address: int
    size: int
    kind: str
    target: int | None = None  # for jump labels: the only branch target allowed


def _s32(blob: bytes, off: int) -> int:
    return int(struct.unpack_from("<i", blob, off)[0])


def _s64(blob: bytes, off: int) -> int:
    return int(struct.unpack_from("<q", blob, off)[0])


def _u64(v: int) -> int:
    return v & 0xFFFF_FFFF_FFFF_FFFF


def parse_jump_table(blob: bytes, base: int) -> list[JumpEntry]:
    """``__jump_table`` bytes loaded at ``base``; a trailing partial entry is ignored and
    at most :data:`MAX_ENTRIES` are read."""
    n = min(len(blob) // JUMP_ENTRY_SIZE, MAX_ENTRIES)
    out = []
    for i in range(n):
        off = i * JUMP_ENTRY_SIZE
        at = base + off
        code = _u64(at + _s32(blob, off))
        target = _u64(at + 4 + _s32(blob, off + 4))
        key = _u64(at + 8 + _s64(blob, off + 8))
        out.append(JumpEntry(code, target, key & ~3, bool(key & 1)))
    return out


def parse_static_call_sites(blob: bytes, base: int) -> list[StaticCallSite]:
    """``__static_call_sites`` bytes loaded at ``base`` (same bounds as the jump table)."""
    n = min(len(blob) // STATIC_CALL_SITE_SIZE, MAX_ENTRIES)
    out = []
    for i in range(n):
        off = i * STATIC_CALL_SITE_SIZE
        at = base + off
        addr = _u64(at + _s32(blob, off))
        key = _u64(at + 4 + _s32(blob, off + 4))
        out.append(StaticCallSite(addr, key & ~3, bool(key & 1)))
    return out


MAX_BRANCH = 1 << 26
"""A jump label branches inside its own function (or to its cold part nearby): a run of
entries whose targets lie further away is some other table."""


def find_jump_table(
    blob: bytes, base: int, text: tuple[int, int], keys: tuple[int, int], min_run: int = 64
) -> tuple[int, int] | None:
    """The jump table found by structure in ``blob`` (loaded at ``base``), for images
    without symbols: the longest run of 8-aligned 16-byte entries whose ``code`` and
    ``target`` fall in ``text`` and whose ``key`` falls in ``keys`` (start, end: both
    half-open). Returns (address, size) or None when no run of ``min_run`` exists.

    Why by structure: the cached Debian vmlinux images carry no symbol table, and a
    guest whose kallsyms lacks ``__start___jump_table`` still has the table itself.
    """

    def ok(off: int) -> bool:
        at = base + off
        code = _u64(at + _s32(blob, off))
        target = _u64(at + 4 + _s32(blob, off + 4))
        key = _u64(at + 8 + _s64(blob, off + 8)) & ~3
        return (
            text[0] <= code < text[1]
            and text[0] <= target < text[1]
            and 0 < abs(target - code) < MAX_BRANCH
            and keys[0] <= key < keys[1]
        )

    best: tuple[int, int] | None = None
    for phase in range(0, JUMP_ENTRY_SIZE, 8):
        run_start, run = phase, 0
        off = phase
        while off + JUMP_ENTRY_SIZE <= len(blob):
            if ok(off):
                if run == 0:
                    run_start = off
                run += 1
            else:
                if run >= min_run and (best is None or run * JUMP_ENTRY_SIZE > best[1]):
                    best = (base + run_start, run * JUMP_ENTRY_SIZE)
                run = 0
            off += JUMP_ENTRY_SIZE
        if run >= min_run and (best is None or run * JUMP_ENTRY_SIZE > best[1]):
            best = (base + run_start, run * JUMP_ENTRY_SIZE)
    return best


def jump_sites(entries: Iterable[JumpEntry]) -> Iterator[Site]:
    """Each jump label as a 5-byte site (the 2-byte form is checked inside it)."""
    for e in entries:
        yield Site(e.code, 5, "jump_label", e.target)


def sized_jump_sites(sites: list[Site], text: bytes, base: int) -> list[Site]:
    """Jump label sites with their real instruction size, read from ``text`` (loaded at
    ``base``): the build picks a 2- or a 5-byte form per site and the kernel keeps it,
    so two 2-byte labels may sit side by side and each must be judged on its own two
    bytes. Sites outside ``text`` are left as they are."""
    out = []
    for st in sites:
        off = st.address - base
        head = text[off : off + 5] if off >= 0 else b""
        two = st.kind == "jump_label" and len(head) >= 2 and head not in NOPS[5]
        if two and jump_form(st, head) == 2:
            st = Site(st.address, 2, st.kind, st.target)
        out.append(st)
    return out


def _rel32_to(data: bytes, at: int, opcode: int) -> int | None:
    if len(data) < 5 or data[0] != opcode:
        return None
    return _u64(at + 5 + _s32(data, 1))


def jump_form(site: Site, data: bytes) -> int | None:
    """The size of the jump label form ``data`` starts with (5: nop5 or ``jmp rel32`` to
    the site's target; 2: nop2 or ``jmp rel8`` to it), or None: not a form of this site."""
    if data[:5] in NOPS[5] or _rel32_to(data, site.address, JMP32) == site.target:
        return 5
    two = data[:2]
    if two in NOPS[2]:
        return 2
    rel8 = struct.unpack("<b", two[1:2])[0] if len(two) == 2 else None
    if (
        two[:1] == bytes([JMP8])
        and rel8 is not None
        and _u64(site.address + 2 + rel8) == site.target
    ):
        return 2
    return None


def allowed_at(
    site: Site, ref: bytes, now: bytes, call_ok: Callable[[int], bool] | None = None
) -> bool:
    """Whether ``now`` (the site's bytes today) is something the kernel itself may have
    written over ``ref`` (the bytes when the reference was taken). Both are ``site.size``
    bytes long, at ``site.address``. ``call_ok`` says which targets an ftrace site may
    call (ftrace's own entry code and trampolines); without it any call is allowed."""
    if now == ref:
        return True
    if now[:1] == bytes([INT3]) and site.kind != "kprobe":
        # text_poke_bp() patches in three steps (int3, the tail, the first byte): a
        # check may see the int3 with the old or the new tail.
        if now[1:] == ref[1:]:
            return True
        return any(
            allowed_at(site, ref, bytes([first]) + now[1:], call_ok)
            for first in (0x0F, 0x3E, 0x66, JMP32, CALL32, JMP8)
        )
    if site.kind == "jump_label":
        form = jump_form(site, now)
        if site.size == 2:
            return form == 2
        return form == 5 or (form == 2 and now[2:] == ref[2:])
    if site.kind == "ftrace":
        # ftrace writes only the nop or a call into its own code: never a jmp, and a
        # call elsewhere is a hook wearing ftrace's clothes.
        target = _rel32_to(now, site.address, CALL32)
        return now in NOPS[5] or (target is not None and (call_ok is None or call_ok(target)))
    if site.kind == "static_call":
        # A call (or tail jmp) to whatever function is current, or the nop.
        return now in NOPS[5] or now[0] in (CALL32, JMP32)
    if site.kind == "static_call_tramp":
        # __SCT__ trampolines: jmp rel32 to the function, ret (+int3 padding), or nop.
        return now in NOPS[5] or now[0] == JMP32 or now[0] == RET
    if site.kind == "kprobe":
        # int3 over the first byte (the rest unchanged), or an optimized probe's jmp.
        return (now[0] == INT3 and now[1:] == ref[1:]) or now[0] == JMP32
    return False


@dataclass(frozen=True)
class Change:
    """A run of changed bytes no site explains: a foreign write."""

    address: int
    old: bytes
    new: bytes


MAX_GAP = 4
"""Changed bytes closer than this are reported as one change."""


def diff_runs(ref: bytes, now: bytes, base: int) -> list[tuple[int, int]]:
    """Changed byte runs (address, length) between two equal-length buffers."""
    runs: list[tuple[int, int]] = []
    n = min(len(ref), len(now))
    i = 0
    while i < n:
        if ref[i] == now[i]:
            i += 1
            continue
        j = i
        last = i
        while j < n and j - last <= MAX_GAP:
            if ref[j] != now[j]:
                last = j
            j += 1
        runs.append((base + i, last - i + 1))
        i = last + 1
    return runs


def foreign_changes(
    ref: bytes,
    now: bytes,
    base: int,
    sites: list[Site],
    call_ok: Callable[[int], bool] | None = None,
) -> list[Change]:
    """The changes between ``ref`` and ``now`` (both loaded at ``base``) not explained by
    the kernel's own patch sites. ``sites`` must be sorted by address."""
    addrs = [s.address for s in sites]
    out: list[Change] = []
    pending: list[int] = []  # addresses of changed bytes no site allowed
    for start, length in diff_runs(ref, now, base):
        for a in range(start, start + length):
            if ref[a - base] == now[a - base]:
                continue
            i = bisect.bisect_right(addrs, a) - 1
            explained = False
            # Sites never overlap in practice, but a forged table might: look back a few.
            for j in range(max(0, i - 2), i + 1):
                s = sites[j]
                if s.address <= a < s.address + s.size:
                    lo, hi = s.address - base, s.address - base + s.size
                    if (
                        lo >= 0
                        and hi <= len(now)
                        and allowed_at(s, ref[lo:hi], now[lo:hi], call_ok)
                    ):
                        explained = True
                        break
            if not explained:
                pending.append(a)
    # Group foreign bytes into runs for the event.
    k = 0
    while k < len(pending):
        first = last = pending[k]
        k += 1
        while k < len(pending) and pending[k] - last <= MAX_GAP:
            last = pending[k]
            k += 1
        lo, hi = first - base, last - base + 1
        out.append(Change(first, ref[lo:hi], now[lo:hi]))
    return out


MAX_TREE_NODES = 1 << 14
RB_RIGHT, RB_LEFT = 8, 16  # struct rb_node: __rb_parent_color, rb_right, rb_left


def walk_rbtree(
    read_u64: Callable[[int], int], top: int, max_nodes: int = MAX_TREE_NODES
) -> tuple[list[int], str | None]:
    """Every node of a red-black tree from its top node (``rb_root.rb_node``), as the
    guest's memory says: ``(nodes, None)``, or the nodes found and why the walk stopped
    (a node seen twice: a cycle; too many nodes; an unreadable link).

    Why no recursion and a seen-set: the tree is in guest memory, which the guest may
    forge into a cycle or an endless chain; the walk must end, and say so."""
    nodes: list[int] = []
    seen: set[int] = set()
    stack = [top]
    while stack:
        node = stack.pop()
        if not node:
            continue
        if node in seen:
            return nodes, f"node {node:#x} reached twice (a cycle)"
        if len(nodes) >= max_nodes:
            return nodes, f"more than {max_nodes} nodes"
        seen.add(node)
        nodes.append(node)
        try:
            stack += [read_u64(node + RB_LEFT), read_u64(node + RB_RIGHT)]
        except VmshieldError as e:
            return nodes, f"node {node:#x} is unreadable: {e}"
    return nodes, None


PAGE = 4096
FILLER = (0xCC, 0x00)  # int3 (what the kernel fills unused executable memory with), zero


def is_filler(page: bytes) -> bool:
    """A page of one filler byte throughout holds no code (the unused part of a BPF
    program pack or of an executable-memory cache: the kernel fills those with int3)."""
    return bool(page) and page[0] in FILLER and page.count(page[0]) == len(page)


def unowned_runs(pages: Iterable[int], owners: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Runs ``(start, page count)`` of executable pages that overlap no owner's range
    ``[start, end)`` (a module's text, a BPF image, a kprobe slot page, an ftrace
    trampoline). Owners are widened to whole pages: an allocation owns its page."""
    merged: list[list[int]] = []
    for lo, hi in sorted((s & ~(PAGE - 1), (e + PAGE - 1) & ~(PAGE - 1)) for s, e in owners
                         if e > s):  # fmt: skip
        if merged and lo <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    starts = [lo for lo, _ in merged]
    runs: list[tuple[int, int]] = []
    for va in sorted(set(pages)):
        i = bisect.bisect_right(starts, va) - 1
        if i >= 0 and va < merged[i][1]:
            continue
        if runs and runs[-1][0] + runs[-1][1] * PAGE == va:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((va, 1))
    return runs
