"""list_head walks over hostile next pointers: a list, or a GuestFormatError, quickly."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmshield.errors import GuestFormatError
from vmshield.guest.lists import list_entries


class FakeKernel:
    """Just ``u64``: next pointers by address."""

    def __init__(self, nxt: dict[int, int]) -> None:
        self.nxt = nxt

    def u64(self, va: int) -> int:
        return self.nxt.get(va, 0)


def walk(nxt: dict[int, int], head: int, limit: int = 100) -> list[int]:
    k: Any = FakeKernel(nxt)
    return list_entries(k, head, 8, limit, "test")


def test_entries_are_containers_in_list_order() -> None:
    assert walk({0x100: 0x208, 0x208: 0x308, 0x308: 0x100}, 0x100) == [0x200, 0x300]
    assert walk({0x100: 0x100}, 0x100) == []


def test_cycle_that_misses_the_head() -> None:
    with pytest.raises(GuestFormatError, match="loops back"):
        walk({0x100: 0x208, 0x208: 0x308, 0x308: 0x208}, 0x100)


def test_too_long() -> None:
    nxt = {0x100: 0x1000}
    nxt.update({0x1000 + i * 16: 0x1000 + (i + 1) * 16 for i in range(500)})
    with pytest.raises(GuestFormatError, match="longer than 100"):
        walk(nxt, 0x100)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.integers(0, 64), st.integers(0, 64), max_size=64))
def test_random_pointers(nxt: dict[int, int]) -> None:
    try:
        out = walk(nxt, 0, limit=40)
    except GuestFormatError:
        return
    assert len(out) <= 40 and len(set(out)) == len(out)
