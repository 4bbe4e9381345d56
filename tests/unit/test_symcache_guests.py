"""One guest cannot poison what the symbol cache tells vmshield about another.

Two synthetic kernels are laid out in synthetic guest RAM (``synth_kernel``: page
tables, a text page, kallsyms in read-only data, ``linux_banner`` and a BTF blob) and
attached with the real ``Kernel.attach``. They have byte-identical kallsyms, so they
share one cache entry, but different BTF: the layouts each one resolves must come from
its own BTF, whichever guest attached first, and a cached attach must still not parse
BTF.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from tests.unit.synth_kernel import BTF_AT, DATA_PA, RODATA_PA, SynthGuest, kernel_btf, make_guest
from vmshield.guest.kernel import Kernel
from vmshield.guest.symcache import SymbolCache


def guest(pid_offset: int) -> SynthGuest:
    """A guest whose BTF puts ``task_struct.pid`` at ``pid_offset``."""
    return make_guest(kernel_btf(pid_offset))


def attach(g: SynthGuest, cache: SymbolCache) -> Kernel:
    return g.attach(cache)


def done(k: Kernel, cache: SymbolCache) -> None:
    """What the CLI does when an attach ends: store what it learnt."""
    if k.build.dirty:
        cache.store(k.build)


def parsed_btf(k: Kernel) -> bool:
    return "btf" in vars(k)  # cached_property: present once BTF was parsed


def test_equal_kallsyms_different_btf_share_symbols_not_layouts(tmp_path: Path) -> None:
    cache = SymbolCache(tmp_path)
    honest, poisoned = guest(0x04), guest(0x70)
    assert honest.ram.mem[RODATA_PA:DATA_PA] == poisoned.ram.mem[RODATA_PA:DATA_PA]

    # The poisoned guest attaches first and fills the cache with its layout.
    kp = attach(poisoned, cache)
    assert not kp.stats.cached
    assert kp.member_offset("task_struct", "pid") == 0x70
    done(kp, cache)

    # The honest guest shares the kallsyms entry but resolves from its own BTF.
    kh = attach(honest, cache)
    assert kh.stats.cached
    assert kh.release == "6.1.0-synthetic"
    assert kh.member_offset("task_struct", "pid") == 0x04
    assert parsed_btf(kh)
    done(kh, cache)

    # Both are cached now, each under its own BTF: no parse, each its own offset.
    for g, want in ((honest, 0x04), (poisoned, 0x70), (honest, 0x04)):
        k = attach(g, cache)
        assert k.stats.cached
        assert k.member_offset("task_struct", "pid") == want
        assert k.sizeof("task_struct") == 0x80
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
    forged = kernel_btf(0x40)
    g.ram.mem[DATA_PA + BTF_AT : DATA_PA + BTF_AT + len(forged)] = forged
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
    forged = kernel_btf(0x40)
    g.ram.mem[DATA_PA + BTF_AT : DATA_PA + BTF_AT + len(forged)] = forged
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
