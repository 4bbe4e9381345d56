"""Filters in the guest (issue 12): the agent's C decides every filter exactly as the
exit engine's Python does.

The agent's own source (``space/agent.c``, unchanged) is compiled for the host with a
stub of the kernel helpers it names, and its record-side functions (``subjects``,
``rule_wants_process``, ``rule_wants_data``, ``agg_key``) are called through ctypes on
records built as the agent builds them. The same record goes through the host's
decoder and :func:`vmshield.objects.filters.match_filter` (what the exit engine
applies to the fields it decodes): a table of corner cases and a hypothesis property
over random patterns (classes, negation, ranges, stars, non-ASCII) and random subjects
(invalid UTF-8, cut paths, every socket family, faulted items) must agree everywhere.
"""

from __future__ import annotations

import ctypes as C
import ipaddress
import socket
import struct
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmshield.errors import VmshieldError
from vmshield.monitor.space_engine import _rule
from vmshield.objects.catalog import plan_for
from vmshield.objects.filters import match_filter
from vmshield.space import agent, captures
from vmshield.space import layout as L
from vmshield.space.rings import encode_items
from vmshield.space.rules import glob_program, rule_problem

STUB = r"""
#include "layout.h"
#define EXPORT __attribute__((visibility("default")))
long copy_from_kernel_nofault(void *dst, const void *src, unsigned long n)
{
    for (unsigned long i = 0; i < n; i++)
        ((char *)dst)[i] = ((const char *)src)[i];
    return 0;
}
long strncpy_from_kernel_nofault(char *d, const void *s, long n) { (void)d; (void)s; return n; }
long strncpy_from_user_nofault(char *d, const void *s, long n) { (void)d; (void)s; return n; }
char *d_path(const void *p, char *b, int n) { (void)p; (void)n; return b; }
char *d_absolute_path(const void *p, char *b, int n) { (void)p; (void)n; return b; }
unsigned long long ktime_get_mono_fast_ns(void) { return 0; }
const struct vms_config vms_config;
#include "AGENT"
EXPORT int t_match(const struct vms_site *site, const struct vms_record *rec, const u8 *data,
           long used, const u64 *frame, u32 rule)
{
    struct subjects x;
    subjects(site, rec, data, used, frame, &x);
    return rule_wants_process(&site->rules[rule], rec) &&
           rule_wants_data(&site->rules[rule], &x);
}
EXPORT u32 t_key(const struct vms_site *site, const struct vms_record *rec, const u8 *data,
         long used, const u64 *frame, u8 *out)
{
    struct subjects x;
    const u8 *k = 0;
    subjects(site, rec, data, used, frame, &x);
    u32 n = agg_key(site->aggregate - 1, &x, data, used, &k);
    for (u32 i = 0; i < n && i < 200; i++)
        out[i] = k[i];
    return n;
}
"""


@pytest.fixture(scope="module")
def lib(tmp_path_factory: pytest.TempPathFactory) -> Any:
    d: Path = tmp_path_factory.mktemp("agent-host")
    (d / "layout.h").write_text(L.c_header())
    (d / "stub.c").write_text(STUB.replace("AGENT", str(agent.source_path())))
    so = d / "agent_host.so"
    subprocess.run(
        ["gcc", "-O1", "-shared", "-fPIC", "-fvisibility=hidden", "-Wall", "-Werror",
         "-Wno-unused-function", f"-I{d}", str(d / "stub.c"), "-o", str(so)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return C.CDLL(str(so))


# A kernel where every cred field is 8 bytes from the last (uid first), other offsets 8.
CRED_AT = {"uid": 4, "euid": 12, "gid": 8, "egid": 16, "fsuid": 28, "cap_effective": 40}
KERNEL: Any = SimpleNamespace(member_offset=lambda s, f: CRED_AT[f] if s == "cred" else 8)


def _site(obj: str, filters: dict[str, str]) -> tuple[L.Site, captures.Plan]:
    plan = plan_for(obj, KERNEL)
    s = L.Site()
    captures.fill_site(s, plan)
    s.rules[0] = _rule("log", filters)
    s.nrules = 1
    s.aggregate = 1 + plan.agg_key
    return s, plan


def _host(plan: captures.Plan, rec: L.Record, args: list[int], data: bytes) -> dict[str, Any]:
    """The fields the host decodes from the record (the security space's decoder, held
    equal to the exit engine's by the integration tests)."""
    cap = captures.Captured(args, captures.parse_items(data, rec.nitems))
    try:
        return plan.decode(cap)
    except VmshieldError:
        return {}


def both(lib: Any, obj: str, filters: dict[str, str], comm: bytes,
         items: list[tuple[int, int, bytes]],
         args: list[int] | None = None) -> tuple[bool, bool]:  # fmt: skip
    """(the agent's answer, the exit engine's answer) for one record."""
    site, plan = _site(obj, filters)
    rec = L.Record()
    rec.pid, rec.uid, rec.comm, rec.nitems = 42, 1000, comm, len(items)
    args = args or [0] * 6
    data = encode_items(items)
    frame = (C.c_uint64 * 13)(0, 0, 0, args[5], args[4], args[0], args[1], args[2], args[3])
    got = bool(lib.t_match(C.byref(site), C.byref(rec), data, len(data), frame, 0))
    fields = _host(plan, rec, args, data)
    proc = {
        "pid": 42,
        "uid": 1000,
        "comm": comm.split(b"\0", 1)[0].decode(errors="backslashreplace"),
    }
    want = all(match_filter(k, v, fields, proc) for k, v in filters.items())
    if site.rules[0].has & L.R_HOST:  # a pattern too long for the rule: the host decides
        assert got or not want  # what the agent did decide never loses a wanted hit
        return want, want
    return got, want


def _sockaddr_in(addr: str, port: int) -> bytes:
    return struct.pack("<H", socket.AF_INET) + struct.pack(">H", port) + socket.inet_aton(addr)


def _sockaddr_in6(addr: str, port: int) -> bytes:
    return (struct.pack("<H", socket.AF_INET6) + struct.pack(">H", port) + bytes(4)
            + ipaddress.IPv6Address(addr).packed + bytes(4))  # fmt: skip


def _cred(**vals: int) -> bytes:
    b = bytearray(48)
    for f, at in CRED_AT.items():
        w = 8 if f == "cap_effective" else 4
        b[at - 4 : at - 4 + w] = vals.get(f, 1000).to_bytes(w, "little")
    return bytes(b)


OK, FAULT, TRUNC = L.S_OK, L.S_FAULT, L.S_TRUNC
# (object, filters, comm, [], None) for kfunc, else (object, filters, items, arguments)
TABLE: list[tuple[Any, ...]] = [
    ("kfunc:x", {"comm": "vm[st]test"}, b"vmstest", [], None),
    ("kfunc:x", {"comm": "vm[!s]test"}, b"vmstest", [], None),
    ("kfunc:x", {"comm": "[]a]*"}, b"]x", [], None),
    ("kfunc:x", {"comm": "[!]a]*"}, b"]x", [], None),
    ("kfunc:x", {"comm": "[a-c-e]x"}, b"-x", [], None),
    ("kfunc:x", {"comm": "[z-a]x"}, b"zx", [], None),
    ("kfunc:x", {"comm": "[!]"}, b"[!]", [], None),
    ("kfunc:x", {"comm": "a?c"}, "aéc".encode(), [], None),
    ("kfunc:x", {"comm": "a????c"}, b"a\xffc", [], None),
    ("kfunc:x", {"comm": "a\\x[e-f]f*"}, b"a\xff", [], None),
    ("kfunc:x", {"comm": "*é"}, "café".encode(), [], None),
    ("kfunc:x", {"pid": "042"}, b"x", [], None),
    ("kfunc:x", {"pid": "42", "uid": "1000"}, b"x", [], None),
    ("kfunc:x", {"uid": "-1"}, b"x", [], None),
    ("file.open", {"path": "/etc/[ps]ass*"}, [(4, OK, b"/etc/passwd\0"),
     (1, OK, bytes(4)), (1, OK, bytes(4))], None),
    ("file.open", {"path": "/etc/*"}, [(4, FAULT, b""), (1, OK, bytes(4)), (1, OK, bytes(4))],
     None),
    ("file.open", {"path": "*"}, [(4, OK, b"/x\0"), (1, FAULT, b""), (1, OK, bytes(4))], None),
    ("file.open", {"path": "/ab[cd]/x"}, [(4, TRUNC, b"/ab[c\0"), (1, OK, bytes(4)),
     (1, OK, bytes(4))], None),
    ("file.open", {"path": "/ab[cd]/x"}, [(4, TRUNC, b"/abd/\0"), (1, OK, bytes(4)),
     (1, OK, bytes(4))], None),
    ("file.open", {"path": "/ab[cd]/x"}, [(4, TRUNC, b"/abe\0"), (1, OK, bytes(4)),
     (1, OK, bytes(4))], None),
    ("file.open", {"path": "/a/[*]"}, [(4, TRUNC, b"/a/[zzz\0"), (1, OK, bytes(4)),
     (1, OK, bytes(4))], None),
    ("file.open", {"path": "/nope"}, [(4, TRUNC, b".../x\0"), (1, OK, bytes(4)),
     (1, OK, bytes(4))], None),
    ("process.exec", {"path": "/usr/bin/*"}, [(2, OK, b"/usr/bin/id\0"), (5, FAULT, b"")],
     None),
    ("net.connect", {"address": "10.0.*", "port": "8[0-9]"},
     [(1, OK, _sockaddr_in("10.0.2.2", 80) + bytes(20))], [0, 0, 16, 0, 0, 0]),
    ("net.connect", {"address": "10.0.*"}, [(1, OK, _sockaddr_in("10.0.2.2", 80) + bytes(20))],
     [0, 0, 4, 0, 0, 0]),
    ("net.connect", {"address": "fe80::*:1"},
     [(1, OK, _sockaddr_in6("fe80::1:0:0:1", 22))], [0, 0, 28, 0, 0, 0]),
    ("net.connect", {"address": "::ffff:*"},
     [(1, OK, _sockaddr_in6("::ffff:1.2.3.4", 22))], [0, 0, 28, 0, 0, 0]),
    ("net.connect", {"address": "1:0:0:2::3"},
     [(1, OK, _sockaddr_in6("1:0:0:2:0:0:0:3", 22))], [0, 0, 28, 0, 0, 0]),
    ("net.connect", {"port": "*"}, [(1, OK, b"\x01\x00/tmp/s\0" + bytes(18))],
     [0, 0, 28, 0, 0, 0]),
    ("net.connect", {"address": "*"}, [(1, OK, b"\x11\x00" + bytes(26))], [0, 0, 28, 0, 0, 0]),
    ("net.connect", {"port": "N*"}, [(1, FAULT, b"")], [0, 0, 28, 0, 0, 0]),
    ("net.listen", {"address": "0.0.0.0", "port": "22"},
     [(1, OK, struct.pack("<H", 22)), (1, OK, b"\x02\x00"), (1, OK, bytes(4))], None),
    ("cred.change", {"escalation": "True"}, [(1, OK, _cred(euid=0)), (1, OK, _cred())], None),
    ("cred.change", {"escalation": "True"}, [(1, OK, _cred(euid=0)), (1, OK, _cred(euid=0))],
     None),
    ("cred.change", {"changed": "False"}, [(1, OK, _cred()), (1, OK, _cred())], None),
    ("cred.change", {"changed": "True"}, [(1, OK, _cred(cap_effective=5)), (1, OK, _cred())],
     None),
    ("cred.change", {"changed": "*"}, [(1, FAULT, b""), (1, OK, _cred())], None),
    ("cred.change", {"changed": "True"}, [(1, FAULT, b""), (1, OK, _cred())], None),
]  # fmt: skip


def test_table_agent_equals_exit_engine(lib: Any) -> None:
    matches = 0
    for obj, filters, *rest in TABLE:
        if obj.startswith("kfunc:"):
            comm, items, args = rest[0], [], None
        else:
            comm, items, args = b"vmstest", rest[0], rest[1]
        got, want = both(lib, obj, filters, comm, items, args)
        assert got == want, (obj, filters, comm, items)
        matches += want
    assert 10 < matches < len(TABLE)  # the table has both answers


def test_every_filter_is_decided_in_the_guest() -> None:
    for f in ({"address": "10.*"}, {"port": "8[0-9]"}, {"comm": "[ab]*"},
              {"escalation": "True"}, {"changed": "False"}, {"path": "/" + "x" * 200}):  # fmt: skip
        assert not _rule("log", f).has & L.R_HOST and rule_problem(f) is None, f
    assert _rule("deny", {"pid": "x"}).has & L.R_NEVER
    assert _rule("log", {"path": "/" + "x" * 300}).has & L.R_HOST
    assert rule_problem({"path": "/" + "x" * 300})


def test_aggregation_keys(lib: Any) -> None:
    def key(obj: str, items: list[tuple[int, int, bytes]], args: list[int] | None = None) -> bytes:
        site, _plan = _site(obj, {})
        rec = L.Record()
        rec.nitems = len(items)
        data = encode_items(items)
        a = args or [0] * 6
        frame = (C.c_uint64 * 13)(0, 0, 0, a[5], a[4], a[0], a[1], a[2], a[3])
        out = (C.c_uint8 * 200)()
        n = lib.t_key(C.byref(site), C.byref(rec), data, len(data), frame, out)
        return bytes(out[:n])

    assert key("file.unlink", [(4, OK, b"/tmp/a\0")]) == b"/tmp/a"
    assert key("net.connect", [(1, OK, _sockaddr_in("10.0.2.2", 80) + bytes(20))],
               [0, 0, 16, 0, 0, 0]) == b"10.0.2.2:80"  # fmt: skip
    assert key("net.bind", [(1, OK, _sockaddr_in6("::1", 22))], [0, 0, 28, 0, 0, 0]) == b"[::1]:22"
    assert key("cred.change", [(1, OK, _cred(euid=0)), (1, OK, _cred())]) == b"0"
    big = 2147352576  # a container's uid range: ten digits, once cut to eight bytes
    assert key("cred.change", [(1, OK, _cred(euid=big)), (1, OK, _cred())]) == b"2147352576"
    assert key("cred.change", [(1, FAULT, b""), (1, OK, _cred())]) == b""
    assert key("module.load", [(2, OK, b"ext4\0")]) == b"ext4"
    assert key("kfunc:x", []) == b""


# -- the property: random patterns, random subjects ----------------------------------------

PAT_CHARS = st.sampled_from([*"ab/.:-!]*?[0f9", "[a-c]", "[!a]", "é", "[]", "x"])
pattern = st.lists(PAT_CHARS, min_size=1, max_size=12).map("".join)
text = st.lists(st.sampled_from([b"a", b"b", b"/", b".", b"-", b"]", b"[", b"!", b"0", b"9",
                                 b"f", b":", "é".encode(), b"\xff", b"\xc3", b"x"]),
                max_size=12).map(b"".join)  # fmt: skip


@settings(max_examples=400, deadline=None)
@given(pattern, text)
def test_comm_globs_agree(lib: Any, pat: str, comm: bytes) -> None:
    got, want = both(lib, "kfunc:x", {"comm": pat}, comm[:15], [])
    assert got == want


@settings(max_examples=400, deadline=None)
@given(pattern, text, st.sampled_from([OK, TRUNC, FAULT]), st.booleans())
def test_path_globs_agree(lib: Any, pat: str, path: bytes, status: int, rooted: bool) -> None:
    p = (b"/" if rooted else b"") + path
    items = [(4, status, p + b"\0" if status != FAULT else b""), (1, OK, bytes(4)),
             (1, OK, bytes(4))]  # fmt: skip
    got, want = both(lib, "file.open", {"path": "/" + pat}, b"x", items)
    assert got == want


sockaddr = st.one_of(
    st.tuples(st.ip_addresses(v=4), st.integers(0, 65535)).map(
        lambda a: _sockaddr_in(str(a[0]), a[1]) + bytes(20)),
    st.tuples(st.ip_addresses(v=6), st.integers(0, 65535)).map(
        lambda a: _sockaddr_in6(str(a[0]), a[1])),
    st.binary(min_size=28, max_size=28).map(lambda b: b"\x01\x00" + b[2:]),
    st.binary(min_size=28, max_size=28),
)  # fmt: skip
addr_pat = st.lists(st.sampled_from([*"0123456789abcdef.:*?", "[0-4]", "[!:]"]),
                    min_size=1, max_size=10).map("".join)  # fmt: skip


@settings(max_examples=400, deadline=None)
@given(sockaddr, st.integers(0, 40), addr_pat, st.sampled_from(["*", "8?", "[0-9]*", "22"]),
       st.booleans())  # fmt: skip
def test_address_and_port_agree(lib: Any, raw: bytes, addrlen: int, apat: str, ppat: str,
                                fault: bool) -> None:  # fmt: skip
    items = [(1, FAULT, b"")] if fault else [(1, OK, raw)]
    for filters in ({"address": apat}, {"port": ppat}, {"address": apat, "port": ppat}):
        got, want = both(lib, "net.connect", filters, b"x", items, [0, 0, addrlen, 0, 0, 0])
        assert got == want, filters


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(list(CRED_AT)),
                       st.sampled_from([0, 1000, 1001, 2147352576, 0xFFFFFFFF]), max_size=6),
       st.dictionaries(st.sampled_from(list(CRED_AT)),
                       st.sampled_from([0, 1000, 1001, 2147352576, 0xFFFFFFFF]), max_size=6),
       st.sampled_from(["True", "False", "*", "T*", "None"]),
       st.sampled_from(["escalation", "changed"]), st.booleans())  # fmt: skip
def test_cred_filters_agree(lib: Any, new: dict[str, int], old: dict[str, int], val: str,
                            key: str, fault: bool) -> None:  # fmt: skip
    items = [(1, FAULT if fault else OK, b"" if fault else _cred(**new)), (1, OK, _cred(**old))]
    got, want = both(lib, "cred.change", {key: val}, b"x", items)
    assert got == want


def test_programs_fit_and_end() -> None:
    assert glob_program("ab") == b"ab\0"
    assert glob_program("a**b") == bytes([ord("a"), L.G_STAR, ord("b"), L.G_END])
    assert glob_program("[b-a]")[:2] == bytes([L.G_CLASS, 0])  # an empty range: no match
