"""``ps`` and ``modules`` over a guest whose structures are partly unreadable.

The guest is the synthetic kernel of ``synth_kernel`` (real ``Kernel.attach``, real
page tables, real BTF resolution): a task whose cred pointer leads nowhere, a module
whose fields sit on an unmapped page, a list whose link points at unmapped memory. One
unreadable entry must be listed as such, and the walk must go on past it.
"""

from __future__ import annotations

from tests.unit.synth_kernel import (
    DATA_VA,
    MODULE,
    TASK,
    UNMAPPED,
    SynthGuest,
    add_module,
    add_task,
    link,
    make_guest,
)
from vmshield.guest.modules import modules
from vmshield.guest.tasks import tasks


def three_tasks(g: SynthGuest, bad_cred: bool = False) -> list[int]:
    t1 = add_task(g, 0x2100, 1, b"init", DATA_VA + 0x3000)
    t2 = add_task(g, 0x2200, 42, b"evil", UNMAPPED if bad_cred else DATA_VA + 0x3040, uid=1000)
    t3 = add_task(g, 0x2300, 77, b"sh", DATA_VA + 0x3080)
    head = g.symbols["init_task"] + TASK["tasks"]
    link(g, head, [t + TASK["tasks"] for t in (t1, t2, t3)])
    return [t1, t2, t3]


def test_all_readable() -> None:
    g = make_guest(fill=three_tasks)
    ts = tasks(g.attach())
    assert [(t.pid, t.comm, t.uid, t.error) for t in ts] == [
        (1, "init", 0, ""),
        (42, "evil", 1000, ""),
        (77, "sh", 0, ""),
    ]


def test_unreadable_task_is_listed_and_the_walk_goes_on() -> None:
    found: list[int] = []
    g = make_guest(fill=lambda g: found.extend(three_tasks(g, bad_cred=True)))
    ts = tasks(g.attach())
    assert [t.pid for t in ts] == [1, -1, 77]
    bad = ts[1]
    assert bad.address == found[1] and bad.error and bad.name == "?"
    assert f"{UNMAPPED + 4:#x} is not mapped" in bad.error  # cred->uid


def test_broken_task_list_keeps_what_came_before() -> None:
    def fill(g: SynthGuest) -> None:
        _t1, t2, _t3 = three_tasks(g)
        g.u64(t2 + TASK["tasks"], UNMAPPED)  # t2's next: into unmapped memory

    g = make_guest(fill=fill)
    ts = tasks(g.attach())
    assert [t.pid for t in ts[:2]] == [1, 42]
    assert ts[2].address == UNMAPPED - TASK["tasks"] and ts[2].error  # the entry it points at
    assert ts[-1].address == 0 and "task list link" in ts[-1].error  # where it broke


def test_unreadable_module_is_listed_and_the_walk_goes_on() -> None:
    page = 0x7000  # modules around an unmapped page boundary

    def fill(g: SynthGuest) -> None:
        m1 = add_module(g, 0x4100, b"crc32")
        # m2's list_head ends its page; its name and layout lie on the next, unmapped one
        m2 = DATA_VA + page - 0x10
        m3 = add_module(g, 0x4300, b"ext4")
        link(g, g.symbols["modules"], [m + MODULE["list"] for m in (m1, m2, m3)])
        g.unmap_page(DATA_VA + page)

    g = make_guest(fill=fill)
    ms = modules(g.attach())
    assert [(m.name, m.state) for m in ms] == [
        ("crc32", "live"),
        ("?", "unreadable"),
        ("ext4", "live"),
    ]
    assert ms[1].address == DATA_VA + page - 0x10 and ms[1].error
    assert ms[0].size == 0x3000 and not ms[0].error
