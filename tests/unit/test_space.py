"""The security space without a VM: the host/agent contract, the agent's build and
relocation, the capture plans against the real kernels' BTF, and the host's parsing of
records that a hostile guest may have scribbled on."""

from __future__ import annotations

import ctypes as C
import struct
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import capstone
import pytest
from elftools.elf.elffile import ELFFile
from hypothesis import given, settings
from hypothesis import strategies as st

from vmshield.errors import VmshieldError
from vmshield.guest.btf import Btf
from vmshield.monitor.request import PROCESS_OBJECTS
from vmshield.monitor.space_engine import _rule, _rule_problem
from vmshield.objects.catalog import CATALOG, plan_for
from vmshield.paths import kernels_dir
from vmshield.space import agent as agentlib
from vmshield.space import captures
from vmshield.space import layout as L

KERNELS = ("5.10", "6.1", "6.12")
HELPERS = {
    "copy_from_kernel_nofault", "strncpy_from_kernel_nofault", "strncpy_from_user_nofault",
    "d_path", "d_absolute_path", "ktime_get_mono_fast_ns",
}  # fmt: skip
BASE = 0xFFFFFFFFC0400000


@cache
def btf_of(kernel: str) -> Btf:
    path = kernels_dir() / kernel / "vmlinux"
    if not path.is_file():
        pytest.fail(f"{path} is missing: run `make setup`")
    with path.open("rb") as f:
        sec = ELFFile(f).get_section_by_name(".BTF")
        assert sec is not None
        return Btf.parse(sec.data())


class BtfKernel:
    """What capture plans need from a kernel: BTF member offsets."""

    def __init__(self, btf: Btf) -> None:
        self.btf = btf

    def member_offset(self, struct_name: str, path: str) -> int:
        return self.btf.member_offset(struct_name, path)

    def sizeof(self, name: str) -> int:
        return self.btf.sizeof(name)


@cache
def agent_object() -> bytes:
    return agentlib.build().read_bytes()


def test_header_matches_ctypes_and_agent_builds() -> None:
    """The generated header carries _Static_asserts of every struct size: gcc checks
    the C side against ctypes on every build."""
    obj = agent_object()
    elf = ELFFile(__import__("io").BytesIO(obj))
    assert elf.header["e_type"] == "ET_REL"
    assert "struct vms_record" in L.c_header()
    assert C.sizeof(L.Record) + 6 * 8 + L.RECORD_DATA == L.RECORD_MAX


def test_link_resolves_calls_to_kernel_helpers() -> None:
    kernel_syms = {name: 0xFFFFFFFF81000000 + 0x1000 * i for i, name in enumerate(sorted(HELPERS))}
    config = BASE + 0x2000
    img = agentlib.link(agent_object(), BASE, config, kernel_syms.__getitem__)
    assert set(img.imports) == HELPERS
    assert img.gate == BASE  # the gate is the first thing in .text
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    gate = list(md.disasm(img.code, BASE, 40))
    calls = [i for i in gate if i.mnemonic == "call"]
    assert calls and int(calls[0].op_str, 16) == img.symbols["vms_agent"]
    # Every direct call in the agent lands on a kernel helper or inside the image.
    targets = {
        int(i.op_str, 16)
        for i in md.disasm(img.code, BASE)
        if i.mnemonic == "call" and i.op_str.startswith("0x")
    }
    inside = {t for t in targets if BASE <= t < BASE + len(img.code)}
    assert targets - inside <= set(kernel_syms.values())
    # No indirect branches (IBT kernels would fault on them).
    assert not [i for i in md.disasm(img.code, BASE) if i.mnemonic in ("call", "jmp")
                and not i.op_str.startswith("0x")]  # fmt: skip


def test_link_refuses_writable_data_and_unknown_symbols(tmp_path: Path) -> None:
    src = tmp_path / "bad.c"
    src.write_text("int counter; long vms_agent(void) { return ++counter; }\n")
    obj = tmp_path / "bad.o"
    subprocess.run(["gcc", *agentlib.CFLAGS, "-c", str(src), "-o", str(obj)], check=True)
    with pytest.raises(agentlib.AgentError, match="data"):
        agentlib.link(obj.read_bytes(), BASE, BASE + 0x2000, lambda s: 0)

    def missing(name: str) -> int:
        raise VmshieldError(f"no {name}")

    with pytest.raises(VmshieldError, match="no "):
        agentlib.link(agent_object(), BASE, BASE + 0x2000, missing)


def test_link_refuses_out_of_reach_addresses() -> None:
    with pytest.raises(agentlib.AgentError, match="32 bits"):
        agentlib.link(agent_object(), BASE, BASE + 0x2000, lambda s: 0x1000)


@pytest.mark.parametrize("kernel", KERNELS)
def test_plans_fit_a_record_on_real_kernels(kernel: str) -> None:
    k: Any = BtfKernel(btf_of(kernel))
    for name in (*PROCESS_OBJECTS, "kfunc:vfs_read"):
        plan = plan_for(name, k)
        assert len(plan.fetches) <= L.MAX_FETCH
        used = sum((4 + f.len + 7) & ~7 for f in plan.fetches)
        assert used <= L.RECORD_DATA, f"{name} needs {used} bytes"
        assert plan.max_size() == L.RECORD_HEADER + 8 * plan.nargs + used
        for f in plan.fetches:
            assert f.kind in (L.F_KMEM, L.F_KSTR, L.F_USTR, L.F_DPATH, L.F_ARGV)
            assert all(-(1 << 31) <= o < 1 << 31 for o in f.off)
    assert set(PROCESS_OBJECTS) <= set(CATALOG)


@pytest.mark.parametrize("kernel", KERNELS)
def test_kernel_facts_the_agent_relies_on(kernel: str) -> None:
    """Checked offline on the very builds the lab boots: the helpers exist (BTF FUNC),
    the ftrace record layout and the DISABLED flag the patcher writes."""
    btf = btf_of(kernel)
    funcs = set(btf.func_names())
    assert funcs >= HELPERS
    assert {"set_memory_ro", "set_memory_x", "set_memory_nx", "set_memory_rw"} <= funcs
    if kernel == "6.12":
        assert {"execmem_alloc", "execmem_free", "set_memory_rox"} <= funcs
    else:
        assert {"module_alloc", "module_memfree"} <= funcs
    assert btf.enum_value(None, "FTRACE_FL_DISABLED") == 1 << 25
    assert btf.sizeof("dyn_ftrace") == 16 and btf.member_offset("dyn_ftrace", "flags") == 8
    assert btf.member_offset("ftrace_page", "records") == 8


def test_rules_for_every_filter_of_the_request_language() -> None:
    assert _rule_problem({"path": "/etc/shadow", "pid": "12", "comm": "sh*"}) is None
    for f in ({"address": "127.0.0.1"}, {"pid": "abc"}, {"uid": "0123"}, {"comm": "é" * 8},
              {"path": "/etc/[ab]"}, {"port": "2[0-9]"}, {"escalation": "True"}):  # fmt: skip
        assert _rule_problem(f) is None, f
    for bad in ("0123", "²", "4294967296", "abc"):  # never equal to a uid's decimal text
        assert _rule("log", {"uid": bad}).has & L.R_NEVER, bad
    assert "module" in str(_rule_problem({"module": "x"}))
    r = _rule("deny", {"path": "/etc/*", "port": "22", "uid": "0"})
    assert r.action == L.A_DENY and r.has == L.R_PATH | L.R_PORT | L.R_UID
    prog = bytes(r.prog)
    assert prog[r.at[L.T_PATH] :].startswith(b"/etc/\x01\x00")
    assert prog[r.at[L.T_PORT] :].startswith(b"22\x00")


def _items_blob(items: list[tuple[int, int, bytes]]) -> bytes:
    out = bytearray()
    for kind, status, data in items:
        out += struct.pack("<HBB", len(data), kind, status) + data
        out += bytes(-len(out) % 8)
    return bytes(out)


def test_items_round_trip() -> None:
    blob = _items_blob([(L.F_DPATH, L.S_OK, b"/etc/passwd\0"), (L.F_KMEM, L.S_OK, b"\1\0\0\0")])
    items = captures.parse_items(blob, 2)
    assert items[0].text() == "/etc/passwd" and items[1].u(0, 4) == 1


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=L.RECORD_DATA), st.integers(0, 0xFFFF))
def test_items_from_hostile_bytes_are_bounded(data: bytes, count: int) -> None:
    items = captures.parse_items(data, count)
    assert len(items) <= L.MAX_FETCH
    assert sum(len(i.data) for i in items) <= len(data)


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(PROCESS_OBJECTS),
    st.lists(st.tuples(st.integers(0, 5), st.integers(0, 3), st.binary(max_size=64)),
             max_size=L.MAX_FETCH),
    st.lists(st.integers(0, (1 << 64) - 1), min_size=6, max_size=6),
)  # fmt: skip
def test_decoders_never_crash_on_garbage(
    name: str, items: list[tuple[int, int, bytes]], args: list[int]
) -> None:
    k: Any = BtfKernel(btf_of("6.1"))
    plan = plan_for(name, k)
    cap = captures.Captured(args, captures.parse_items(_items_blob(items), len(items)))
    try:
        fields = plan.decode(cap)
    except VmshieldError:
        return
    assert isinstance(fields, dict)


def test_symbol_extent_stops_at_the_next_symbol() -> None:
    from vmshield.guest.symtab import SymbolTable

    names = ["sys_call_table", "next_thing", "user_sym"]
    addrs = [0xFFFFFFFF82000000, 0xFFFFFFFF82000E80, 0x1000]
    t = SymbolTable(names, addrs, "DDU")
    assert t.extent("sys_call_table", 8192) == (addrs[0], 0xE80)
    assert t.extent("sys_call_table", 16) == (addrs[0], 16)
    assert t.extent("next_thing", 64) == (addrs[1], 64)  # the last symbol: the limit
