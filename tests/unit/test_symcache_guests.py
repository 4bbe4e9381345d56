"""One guest cannot poison what the symbol cache tells vmshield about another.

Two synthetic kernels are laid out in synthetic guest RAM (page tables, a text page,
kallsyms in read-only data, ``linux_banner`` and a BTF blob) and attached with the real
``Kernel.attach``. They have byte-identical kallsyms, so they share one cache entry,
but different BTF: the layouts each one resolves must come from its own BTF, whichever
guest attached first, and a cached attach must still not parse BTF.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

from tests.unit.test_btf import Builder
from tests.unit.test_kallsyms_synthetic import KERNEL_BASE, Sym, encode, make_symbols
from tests.unit.test_paging import KB4, NX, RW, P, Ram, Tables
from vmshield.guest.kernel import Kernel
from vmshield.guest.symcache import SymbolCache

TEXT_PA, RODATA_PA, DATA_PA = 0x10_0000, 0x20_0000, 0x60_0000
RODATA_VA, DATA_VA = KERNEL_BASE + 0x20_0000, KERNEL_BASE + 0x60_0000
BANNER = b"Linux version 6.1.0-synthetic (test) #1 SMP\n\0"
BTF_AT = 0x100


def btf_blob(pid_offset: int) -> bytes:
    """A BTF blob with ``struct task_struct { int state; int pid; }`` at a chosen offset
    of ``pid`` (same length for every offset, so equal kallsyms can bound either)."""
    b = Builder()
    i = b.int_("int", 4, signed=True)
    b.struct("task_struct", 0x100, [("state", i, 0), ("pid", i, pid_offset * 8)])
    return b.build()


def kallsyms_blob(btf_len: int) -> bytes:
    """Kallsyms tables for the kernel below (bounds of BTF and the banner included)."""
    syms = make_symbols(random.Random(7), 400, KERNEL_BASE)
    syms += [
        Sym("D", "linux_banner", DATA_VA),
        Sym("R", "__start_BTF", DATA_VA + BTF_AT),
        Sym("R", "__stop_BTF", DATA_VA + BTF_AT + btf_len),
    ]
    enc = encode(syms, KERNEL_BASE, "6.1", seed=7, base_va=RODATA_VA, prefix=64)
    return enc.blob


def guest(pid_offset: int) -> tuple[Ram, Tables]:
    """Guest RAM holding a kernel whose BTF puts ``task_struct.pid`` at ``pid_offset``."""
    btf = btf_blob(pid_offset)
    rodata = kallsyms_blob(len(btf))
    ram = Ram(8 << 20)
    tables = Tables(ram)
    tables.map(KERNEL_BASE, TEXT_PA, KB4, P)  # _text: read-only, executable
    ram.mem[TEXT_PA : TEXT_PA + 4] = b"\x0f\x1f\x44\x00"
    for off in range(0, len(rodata) + KB4 - 1, KB4):
        tables.map(RODATA_VA + off, RODATA_PA + off, KB4, P | NX)
    ram.mem[RODATA_PA : RODATA_PA + len(rodata)] = rodata
    data = BANNER.ljust(BTF_AT, b"\0") + btf
    for off in range(0, len(data) + KB4 - 1, KB4):
        tables.map(DATA_VA + off, DATA_PA + off, KB4, P | RW | NX)
    ram.mem[DATA_PA : DATA_PA + len(data)] = data
    return ram, tables


def attach(g: tuple[Ram, Tables], cache: SymbolCache) -> Kernel:
    ram, tables = g
    k = Kernel.attach(ram.read, tables.cr3, 0, cache)
    return k


def done(k: Kernel, cache: SymbolCache) -> None:
    """What the CLI does when an attach ends: store what it learnt."""
    if k.build.dirty:
        cache.store(k.build)


def parsed_btf(k: Kernel) -> bool:
    return "btf" in vars(k)  # cached_property: present once BTF was parsed


def test_equal_kallsyms_different_btf_share_symbols_not_layouts(tmp_path: Path) -> None:
    cache = SymbolCache(tmp_path)
    honest, poisoned = guest(0x04), guest(0x80)
    assert bytes(honest[0].mem[RODATA_PA:DATA_PA]) == bytes(poisoned[0].mem[RODATA_PA:DATA_PA])

    # The poisoned guest attaches first and fills the cache with its layout.
    kp = attach(poisoned, cache)
    assert not kp.stats.cached
    assert kp.member_offset("task_struct", "pid") == 0x80
    done(kp, cache)

    # The honest guest shares the kallsyms entry but resolves from its own BTF.
    kh = attach(honest, cache)
    assert kh.stats.cached
    assert kh.release == "6.1.0-synthetic"
    assert kh.member_offset("task_struct", "pid") == 0x04
    assert parsed_btf(kh)
    done(kh, cache)

    # Both are cached now, each under its own BTF: no parse, each its own offset.
    for g, want in ((honest, 0x04), (poisoned, 0x80), (honest, 0x04)):
        k = attach(g, cache)
        assert k.stats.cached
        assert k.member_offset("task_struct", "pid") == want
        assert k.sizeof("task_struct") == 0x100
        assert "btf_hash" in k.stats.seconds
        done(k, cache)
    k = attach(honest, cache)
    assert k.member_offset("task_struct", "pid") == 0x04 and not parsed_btf(k)


def test_btf_rewritten_after_caching_is_not_trusted(tmp_path: Path) -> None:
    """The guest's own BTF changes between two attaches (its kernel attacker rewrote
    it): the second attach must resolve again from the bytes it sees now."""
    cache = SymbolCache(tmp_path)
    g = guest(0x04)
    k = attach(g, cache)
    assert k.member_offset("task_struct", "pid") == 0x04
    done(k, cache)
    ram, _tables = g
    forged = btf_blob(0x40)
    ram.mem[DATA_PA + BTF_AT : DATA_PA + BTF_AT + len(forged)] = forged
    k2 = attach(g, cache)
    assert k2.stats.cached
    assert k2.member_offset("task_struct", "pid") == 0x40
    assert parsed_btf(k2)


def test_hash_and_parse_use_the_same_bytes(tmp_path: Path) -> None:
    """BTF is read once per attach: a change after the hash cannot reach the parse."""
    cache = SymbolCache(tmp_path)
    g = guest(0x04)
    k = attach(g, cache)
    digest = k.btf_sha256
    ram, _ = g
    forged = btf_blob(0x40)
    ram.mem[DATA_PA + BTF_AT : DATA_PA + BTF_AT + len(forged)] = forged
    assert k.member_offset("task_struct", "pid") == 0x04
    assert k.btf_sha256 == digest


def test_btf_hash_is_cheap_for_a_kernel_sized_blob(tmp_path: Path) -> None:
    """The per-attach check costs a read and a SHA-256 of the blob: a few ms for the
    4.7 MB of the largest tested kernel, far inside the 0.5 s cached-attach budget."""
    k: Any = attach(guest(0x04), SymbolCache(tmp_path))
    k.__dict__["_btf_blob"] = bytes(5 << 20)
    t0 = time.perf_counter()
    _ = k.btf_sha256
    assert time.perf_counter() - t0 < 0.1
