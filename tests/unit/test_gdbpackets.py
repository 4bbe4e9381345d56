"""Unit and property tests of the gdbstub codec, plus GdbStub against a scripted fake stub.

The fake stub (an in-process Unix socket server) covers what QEMU 7.2 cannot show:
no-ack mode, NAK/retransmission, corrupt and oversized packets, the ``X`` and missing
``P`` paths, a stub that never answers or hangs up.
"""

from __future__ import annotations

import binascii
import contextlib
import itertools
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmshield.errors import HypervisorError
from vmshield.hv.gdbpackets import (
    ACK,
    NAK,
    TAIL_SIZE,
    X86_64_G_SIZE,
    X86_64_REGISTERS,
    GdbError,
    GdbErrorReply,
    GdbPacketTooLarge,
    GdbProtocolError,
    Packet,
    PacketReader,
    StopReply,
    ThreadId,
    X86Registers,
    checksum,
    decode_payload,
    escape_binary,
    frame,
    hex_decode,
    hex_encode,
    looks_like_stop_reply,
    memory_chunks,
    parse_g_reply,
    parse_hex_int,
    parse_qsupported,
    parse_stop_reply,
    parse_thread_id,
    parse_thread_list,
    raise_for_error,
    register_info,
)
from vmshield.hv.gdbstub import (
    GdbConnectionError,
    GdbStateError,
    GdbStub,
    GdbTimeout,
    GdbUnsupported,
)

# ------------------------------------------------------------------ helpers


def packets(events: Sequence[object]) -> list[bytes]:
    return [e.payload for e in events if isinstance(e, Packet)]


def raw_frame(body: bytes) -> bytes:
    return b"$" + body + b"#%02x" % checksum(body)


def sample_registers(**changes: int) -> X86Registers:
    values: dict[str, Any] = {r.name: 0 for r in X86_64_REGISTERS[:33]}
    values.update(rip=0xFFF0, eflags=2, cs=0xF000, cr0=0x60000010, rdx=0x60FB1)
    values.update(changes)
    tail = bytearray(TAIL_SIZE)
    fctrl = register_info("fctrl").offset - 236
    mxcsr = register_info("mxcsr").offset - 236
    tail[fctrl : fctrl + 4] = struct.pack("<I", 0x37F)
    tail[mxcsr : mxcsr + 4] = struct.pack("<I", 0x1F80)
    return X86Registers(**values, tail=bytes(tail))


# ------------------------------------------------------------------ errors


def test_error_hierarchy() -> None:
    for cls in (GdbProtocolError, GdbPacketTooLarge, GdbErrorReply, GdbTimeout, GdbStateError):
        assert issubclass(cls, GdbError)
    assert issubclass(GdbError, HypervisorError)
    err = GdbErrorReply(b"m1000,4", 0x14)
    assert err.code == 0x14
    assert "E14" in str(err) and "EFAULT" in str(err) and "m1000,4" in str(err)


# ------------------------------------------------------------------ framing


def test_frame_known_vectors() -> None:
    assert frame(b"g") == b"$g#67"
    assert frame(b"") == b"$#00"
    assert frame(b"qSupported") == b"$qSupported#37"
    # '$' '#' '}' '*' are escaped as '}' + (byte ^ 0x20); the checksum covers the escaped text.
    assert frame(b"a$b") == raw_frame(b"a}\x04b")
    assert escape_binary(b"#}*$") == b"}\x03}]}\x0a}\x04"


def test_reader_simple_and_acks() -> None:
    r = PacketReader()
    ev = r.feed(b"+$OK#9a-")
    assert ev == [ACK, Packet(b"OK"), NAK]
    assert r.buffered == 0


def test_reader_byte_by_byte() -> None:
    r = PacketReader()
    events: list[object] = []
    for b in b"+$T02thread:01;#04":
        events += r.feed(bytes((b,)))
    assert events == [ACK, Packet(b"T02thread:01;")]


def test_reader_skips_junk_and_resyncs() -> None:
    r = PacketReader()
    # Junk outside packets is dropped; a '$' inside an unfinished packet restarts it.
    ev = r.feed(b"garbage\x00\xff$trunc" + raw_frame(b"OK"))
    assert packets(ev) == [b"OK"]
    ev = r.feed(b"$part")
    assert ev == []
    ev = r.feed(b"ial$E14#aa")
    assert packets(ev) == [b"E14"]


def test_reader_bad_checksum_is_reported_not_raised() -> None:
    r = PacketReader()
    (ev,) = r.feed(b"$OK#00")
    assert isinstance(ev, Packet) and not ev.checksum_ok and ev.payload == b"OK"
    (ev,) = r.feed(b"$OK#zz")
    assert isinstance(ev, Packet) and not ev.checksum_ok
    # the reader goes on
    assert packets(r.feed(b"$OK#9a")) == [b"OK"]


def test_reader_notification() -> None:
    (ev,) = PacketReader().feed(b"%Stop:T05#" + b"%02x" % checksum(b"Stop:T05"))
    assert isinstance(ev, Packet) and ev.notification and ev.payload == b"Stop:T05"


def test_reader_escapes_and_rle() -> None:
    r = PacketReader()
    # The example of the GDB manual: "0* " is "0000".
    assert packets(r.feed(raw_frame(b"0* "))) == [b"0000"]
    assert packets(r.feed(raw_frame(b"}]x}\x03"))) == [b"}x#"]
    # an escaped byte can be repeated
    assert packets(r.feed(raw_frame(b"}\x04*!"))) == [b"$" * 5]


def test_decode_payload_errors() -> None:
    with pytest.raises(GdbProtocolError, match="escape or run"):
        decode_payload(b"abc}")
    with pytest.raises(GdbProtocolError, match="nothing to repeat"):
        decode_payload(b"*!")
    with pytest.raises(GdbProtocolError, match="count byte"):
        decode_payload(b"a*\x01")
    with pytest.raises(GdbPacketTooLarge):
        decode_payload(b"a*~" * 10, max_size=100)


def test_reader_caps_unterminated_packet() -> None:
    r = PacketReader(max_packet_size=1000)
    r.feed(b"$" + b"a" * 600)
    with pytest.raises(GdbPacketTooLarge, match="1000 bytes"):
        r.feed(b"a" * 600)
    assert r.buffered == 0
    # usable afterwards
    assert packets(r.feed(raw_frame(b"OK"))) == [b"OK"]


def test_reader_caps_rle_bomb() -> None:
    r = PacketReader(max_packet_size=1000)
    with pytest.raises(GdbPacketTooLarge):
        r.feed(raw_frame(b"a*~" * 200))  # 600 raw bytes, 19600 decoded


def test_reader_rejects_bad_max() -> None:
    with pytest.raises(ValueError):
        PacketReader(0)


# ------------------------------------------------------------------ hex, replies


def test_hex_helpers() -> None:
    assert hex_encode(b"\x01\xab") == b"01ab"
    assert hex_decode(b"01AB") == b"\x01\xab"
    for bad in (b"0", b"zz", b" 01", b"01 "):
        with pytest.raises(GdbProtocolError):
            hex_decode(bad)
    assert parse_hex_int(b"1f") == 31
    for bad in (b"", b"-1", b"0x1", b"1" * 40):
        with pytest.raises(GdbProtocolError):
            parse_hex_int(bad)


def test_raise_for_error() -> None:
    assert raise_for_error(b"OK", b"x") == b"OK"
    assert raise_for_error(b"", b"x") == b""
    assert raise_for_error(b"E1", b"x") == b"E1"  # not an error reply: odd hex data
    with pytest.raises(GdbErrorReply) as info:
        raise_for_error(b"E22", b"Hg5")
    assert info.value.code == 0x22 and info.value.request == b"Hg5"
    with pytest.raises(GdbErrorReply, match="no such thing") as info2:
        raise_for_error(b"E.no such thing", b"x")
    assert info2.value.code is None


def test_qsupported() -> None:
    f = parse_qsupported(b"PacketSize=1000;qXfer:features:read+;vContSupported+;multiprocess+")
    assert f.packet_size == 0x1000
    assert f.supports("qXfer:features:read") and f.supports("multiprocess")
    assert not f.supports("QStartNoAckMode") and not f.explicitly_unsupported("QStartNoAckMode")
    f = parse_qsupported(b"QStartNoAckMode-;foo=bar;baz?")
    assert f.explicitly_unsupported("QStartNoAckMode") and f.features["foo"] == "bar"
    assert f.supports("baz")
    assert parse_qsupported(b"").packet_size is None
    for bad in (b"PacketSize=zz", b"weird", b"PacketSize=10", b"\xff+"):
        with pytest.raises(GdbProtocolError):
            parse_qsupported(bad)


def test_thread_ids() -> None:
    assert parse_thread_id(b"01") == ThreadId(1)
    assert parse_thread_id(b"-1") == ThreadId(-1)
    assert parse_thread_id(b"p01.02") == ThreadId(2, 1)
    assert parse_thread_id(b"p1") == ThreadId(-1, 1)
    assert ThreadId(0x1A).encode() == b"1a"
    assert ThreadId(2, 1).encode() == b"p1.2"
    assert ThreadId(-1).encode() == b"-1"
    assert parse_thread_list(b"m01,02") == ([ThreadId(1), ThreadId(2)], False)
    assert parse_thread_list(b"l") == ([], True)
    for bad in (b"m", b"x01", b"mzz"):
        with pytest.raises(GdbProtocolError):
            parse_thread_list(bad)


def test_stop_replies() -> None:
    s = parse_stop_reply(b"S05")
    assert s == StopReply("signal", signal=5, raw=b"S05") and s.stopped
    s = parse_stop_reply(b"T02thread:01;")
    assert s.signal == 2 and s.thread == ThreadId(1) and s.watch_kind is None
    s = parse_stop_reply(b"T05thread:p01.02;core:3;")
    assert s.thread == ThreadId(2, 1) and s.core == 3
    s = parse_stop_reply(b"T05thread:01;watch:0000000000006000;")
    assert (s.watch_kind, s.watch_addr, s.reason) == ("watch", 0x6000, "watch")
    s = parse_stop_reply(b"T05thread:01;rwatch:6008;")
    assert (s.watch_kind, s.watch_addr) == ("rwatch", 0x6008)
    s = parse_stop_reply(b"T05awatch:ffff800000001000;thread:02;")
    assert (s.watch_kind, s.watch_addr, s.thread) == ("awatch", 0xFFFF800000001000, ThreadId(2))
    s = parse_stop_reply(b"T05swbreak:;10:f0ff000000000000;06:0100000000000000;x:y")
    assert s.reason == "swbreak"
    assert s.registers == {0x10: bytes.fromhex("f0ff000000000000"), 6: (1).to_bytes(8, "little")}
    assert s.info["x"] == b"y"
    s = parse_stop_reply(b"W00")
    assert (s.kind, s.exit_code, s.stopped) == ("exited", 0, False)
    s = parse_stop_reply(b"X09;process:1a")
    assert (s.kind, s.signal, s.info) == ("terminated", 9, {"process": b"1a"})
    for bad in (b"", b"OK", b"T5", b"S05x", b"T05thread", b"T05watch:zz;", b"W00x", b"Tzz"):
        with pytest.raises(GdbProtocolError):
            parse_stop_reply(bad)
    assert looks_like_stop_reply(b"T02thread:01;") and not looks_like_stop_reply(b"PacketSize")


# ------------------------------------------------------------------ registers


def test_layout_matches_qemu_x86_64() -> None:
    names = [r.name for r in X86_64_REGISTERS]
    assert len(names) == 66 and X86_64_G_SIZE == 608
    assert names[:17] == [
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip",
    ]  # fmt: skip
    offsets = {r.name: (r.regno, r.offset, r.size) for r in X86_64_REGISTERS}
    assert offsets["eflags"] == (17, 136, 4)
    assert offsets["cs"] == (18, 140, 4)
    assert offsets["fs_base"] == (24, 164, 8)
    assert offsets["k_gs_base"] == (26, 180, 8)
    assert offsets["cr0"] == (27, 188, 8)
    assert offsets["cr3"] == (29, 204, 8)
    assert offsets["efer"] == (32, 228, 8)
    assert offsets["st0"] == (33, 236, 10)
    assert offsets["fctrl"] == (41, 316, 4)
    assert offsets["xmm0"] == (49, 348, 16)
    assert offsets["mxcsr"] == (65, 604, 4)


def test_g_reply_parse_and_round_trip() -> None:
    regs = sample_registers(r8=0x0807060504030201, k_gs_base=0xFFFF888000000000, efer=0xD01)
    payload = regs.to_g_payload()
    assert len(payload) == 1216
    parsed = parse_g_reply(payload)
    assert parsed == regs
    assert parsed.origin == bytes.fromhex(payload.decode())
    assert parsed.to_g_payload() == payload
    assert parsed.rip == 0xFFF0 and parsed.cs == 0xF000 and parsed.r8 == 0x0807060504030201
    assert parsed.value("fctrl") == 0x37F and parsed.mxcsr == 0x1F80
    assert parsed.xmm(0) == 0
    assert parsed.gprs()["rdx"] == 0x60FB1
    # raw bytes at the documented offsets
    raw = parsed.to_bytes()
    assert raw[128:136] == (0xFFF0).to_bytes(8, "little")
    assert raw[228:236] == (0xD01).to_bytes(8, "little")


def test_g_reply_truncated_or_bad() -> None:
    good = sample_registers().to_g_payload()
    with pytest.raises(GdbProtocolError, match=r"1214 hex digits, expected 1216"):
        parse_g_reply(good[:-2])
    with pytest.raises(GdbProtocolError, match="expected 1216"):
        parse_g_reply(good + b"00")
    with pytest.raises(GdbProtocolError, match="not valid hex"):
        parse_g_reply(b"zz" + good[2:])
    with pytest.raises(GdbProtocolError, match="608"):
        X86Registers.from_bytes(b"\x00" * 100)


def test_register_changes() -> None:
    regs = parse_g_reply(sample_registers().to_g_payload())
    assert regs.changed_registers() == []
    moved = replace(regs, rip=0x7000, rax=1)
    assert moved.origin == regs.origin
    assert [r.name for r in moved.changed_registers()] == ["rax", "rip"]
    xmm = moved.with_register("xmm3", 0x1122).with_register("mxcsr", b"\x80\x1f\x00\x00")
    assert [r.name for r in xmm.changed_registers()] == ["rax", "rip", "xmm3"]
    assert xmm.value("xmm3") == 0x1122
    assert xmm.raw_register("rip") == (0x7000).to_bytes(8, "little")
    assert len(sample_registers().changed_registers()) == 66  # no origin: everything
    mutated = parse_g_reply(sample_registers().to_g_payload())
    mutated.rip = 0x1234  # mutable on purpose: the origin still says what was read
    assert [r.name for r in mutated.changed_registers()] == ["rip"]
    with pytest.raises(ValueError, match="does not fit"):
        replace(regs, eflags=1 << 32).to_bytes()
    with pytest.raises(ValueError, match="unknown"):
        regs.value("eax")
    with pytest.raises(ValueError, match="takes 16 bytes"):
        regs.with_register("xmm0", b"\x00")
    with pytest.raises(ValueError, match="tail"):
        replace(regs, tail=b"")


def test_memory_chunks() -> None:
    assert list(memory_chunks(0x1000, 0x1000, 2048)) == [(0x1000, 2048), (0x1800, 2048)]
    assert list(memory_chunks(0xFF0, 0x20, 2048)) == [(0xFF0, 0x10), (0x1000, 0x10)]
    assert list(memory_chunks(0x10, 0, 2048)) == []
    assert list(memory_chunks(0, 5000, 2024)) == [(0, 2024), (2024, 2024), (4048, 48), (4096, 904)]


# ------------------------------------------------------------------ properties


_FRAGMENTS = st.one_of(
    st.sampled_from(
        [b"$", b"#", b"}", b"*", b"+", b"-", b"%", b"00", b"9a", b"OK", b"E14", b" ", b"~"]
    ),
    st.sampled_from([frame(b"OK"), frame(b"T05thread:01;"), b"$" + b"a" * 300, b"a*~" * 50]),
    st.binary(max_size=12),
)
_STREAMS = st.one_of(
    st.binary(max_size=4000),
    st.lists(_FRAGMENTS, max_size=200).map(b"".join),
)


@settings(max_examples=500, deadline=None)
@given(data=_STREAMS, cuts=st.lists(st.integers(0, 4000), max_size=20))
def test_random_streams_only_raise_gdb_errors(data: bytes, cuts: list[int]) -> None:
    cap = 256
    r = PacketReader(max_packet_size=cap)
    points = sorted({0, len(data), *(c for c in cuts if c <= len(data))})
    for a, b in itertools.pairwise(points):
        try:
            for ev in r.feed(data[a:b]):
                if isinstance(ev, Packet) and ev.checksum_ok:
                    assert len(ev.payload) <= cap
        except GdbError:
            pass
        assert r.buffered <= cap + 2


@settings(max_examples=200, deadline=None)
@given(
    st.binary(max_size=300).map(lambda b: b + b"$#}*"),
    st.data(),
)
def test_frame_decode_round_trip(payload: bytes, data: st.DataObject) -> None:
    payloads = [payload, b"", b"OK", payload[::-1]]
    stream = b"+".join(frame(p) for p in payloads)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    r = PacketReader()
    events: list[object] = []
    for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=False):
        events += r.feed(stream[a:b])
    assert packets(events) == payloads
    assert events.count(ACK) == 3
    assert r.buffered == 0


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(b"0af$#}*x"), st.integers(1, 200)), max_size=30))
def test_rle_decoding(runs: list[tuple[int, int]]) -> None:
    data = b"".join(bytes((b,)) * n for b, n in runs)
    encoded = _rle_escaped(data)
    assert decode_payload(encoded) == data
    assert packets(PacketReader().feed(raw_frame(encoded))) == [data]


def _rle_escaped(data: bytes) -> bytes:
    """RLE over plain bytes, escaping specials individually (an escape is never repeated
    by this encoder, so runs of specials come out as repeated escapes)."""
    out = bytearray()
    i = 0
    while i < len(data):
        b = data[i]
        if b in b"$#}*":
            out += b"}" + bytes((b ^ 0x20,))
            i += 1
            continue
        run = 1
        while i + run < len(data) and data[i + run] == b and run < 98:
            run += 1
        out.append(b)
        extra = run - 1
        if extra >= 3 and extra not in (6, 7):
            out += b"*" + bytes((extra + 29,))
        else:
            out += bytes((b,)) * extra
        i += run
    return bytes(out)


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=0, max_size=1300))
def test_truncated_g_replies_give_clear_errors(raw: bytes) -> None:
    payload = binascii.hexlify(raw)
    if len(payload) == 1216:
        parse_g_reply(payload)
        return
    with pytest.raises(GdbProtocolError, match=f"{len(payload)} hex digits, expected 1216"):
        parse_g_reply(payload)


@settings(max_examples=100, deadline=None)
@given(st.binary(min_size=608, max_size=608))
def test_register_block_round_trip(raw: bytes) -> None:
    regs = X86Registers.from_bytes(raw)
    assert regs.to_bytes() == raw
    assert parse_g_reply(regs.to_g_payload()) == regs


# ------------------------------------------------------------------ GdbStub vs a fake stub

G_BLOCK = sample_registers().to_bytes()
TARGET_XML = b'<?xml version="1.0"?><target><architecture>i386:x86-64</architecture></target>'

Handler = Callable[["FakeStub", bytes], "bytes | list[bytes] | None"]


class FakeStub:
    """A scripted gdbstub on a Unix socket: replies via ``handler``, records requests.

    A handler returns a payload (framed for it), a list of raw byte strings sent as is,
    or None (no answer).
    """

    def __init__(
        self,
        path: Path,
        handler: Handler | None = None,
        *,
        greeting: bytes = b"",
        no_ack_ok: bool = False,
        x_ok: bool = False,
        p_ok: bool = True,
        ack: bool = True,
    ) -> None:
        self.path = path
        self.handler = handler
        self.greeting = greeting
        self.no_ack_ok = no_ack_ok
        self.x_ok = x_ok
        self.p_ok = p_ok
        self.ack = ack
        self.no_ack = False
        self.requests: list[bytes] = []
        self.last_sent = b""
        self.raw_in = bytearray()
        self.regs = bytearray(G_BLOCK)
        self.memory: dict[int, int] = {}
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        self.server.listen(1)
        self.conn: socket.socket | None = None
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.server.shutdown(socket.SHUT_RDWR)  # wakes a pending accept()
        with contextlib.suppress(OSError):
            self.server.close()
        if self.conn is not None:
            with contextlib.suppress(OSError):
                self.conn.close()
        self.thread.join(timeout=5)

    def send(self, data: bytes) -> None:
        assert self.conn is not None
        self.conn.sendall(data)

    def _serve(self) -> None:
        try:
            conn, _ = self.server.accept()
        except OSError:
            return
        self.conn = conn
        reader = PacketReader()
        if self.greeting:
            conn.sendall(self.greeting)
        while True:
            try:
                data = conn.recv(65536)
            except OSError:
                return
            if not data:
                return
            self.raw_in += data
            for ev in reader.feed(data):
                if ev is NAK and self.last_sent:
                    conn.sendall(self.last_sent)  # like QEMU: resend the last packet
                    continue
                if not isinstance(ev, Packet):
                    continue
                if not ev.checksum_ok:
                    conn.sendall(b"-")
                    continue
                if self.ack and not self.no_ack:
                    conn.sendall(b"+")
                self.requests.append(ev.payload)
                reply = self.handler(self, ev.payload) if self.handler else None
                if reply is None:
                    reply = self.default(ev.payload)
                if isinstance(reply, list):
                    for chunk in reply:
                        conn.sendall(chunk)
                elif reply is not None:
                    self.last_sent = frame(reply)
                    conn.sendall(self.last_sent)
                if ev.payload == b"QStartNoAckMode" and self.no_ack_ok:
                    self.no_ack = True

    def default(self, p: bytes) -> bytes | None:
        if p.startswith(b"qSupported"):
            return b"PacketSize=1000;qXfer:features:read+" + (
                b";QStartNoAckMode+" if self.no_ack_ok else b""
            )
        if p == b"QStartNoAckMode":
            return b"OK" if self.no_ack_ok else b""
        if p.startswith(b"qXfer:features:read:target.xml:"):
            off = int(p.split(b":")[-1].split(b",")[0], 16)
            return b"l" + TARGET_XML[off:]
        if p == b"?":
            return b"S05"
        if p == b"g":
            return hex_encode(bytes(self.regs))
        if p.startswith(b"P"):
            if not self.p_ok:
                return b""
            regno_text, value = p[1:].split(b"=")
            info = X86_64_REGISTERS[int(regno_text, 16)]
            self.regs[info.offset : info.offset + info.size] = bytes.fromhex(value.decode())
            return b"OK"
        if p.startswith(b"p") and self.p_ok:
            info = X86_64_REGISTERS[int(p[1:], 16)]
            return hex_encode(bytes(self.regs[info.offset : info.offset + info.size]))
        if p.startswith(b"G"):
            self.regs[:] = bytes.fromhex(p[1:].decode())
            return b"OK"
        if p.startswith(b"m"):
            a, n = (int(x, 16) for x in p[1:].split(b","))
            if a >= 0x100000:
                return b"E14"
            return hex_encode(bytes(self.memory.get(a + i, 0) for i in range(n)))
        if p.startswith(b"M"):
            head, data = p[1:].split(b":", 1)
            a = int(head.split(b",")[0], 16)
            for i, b in enumerate(bytes.fromhex(data.decode())):
                self.memory[a + i] = b
            return b"OK"
        if p.startswith(b"X"):
            if not self.x_ok:
                return b""
            head, data = p[1:].split(b":", 1)
            a = int(head.split(b",")[0], 16)
            for i, b in enumerate(data):
                self.memory[a + i] = b
            return b"OK"
        if p in (b"c", b"s"):
            return b"T05thread:01;" if p == b"s" else None
        if p == b"D":
            return b"OK"
        return b""


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[Callable[..., FakeStub]]:
    made: list[FakeStub] = []

    def make(handler: Handler | None = None, **kw: object) -> FakeStub:
        stub = FakeStub(tmp_path / f"fake{len(made)}.sock", handler, **kw)  # type: ignore[arg-type]
        made.append(stub)
        return stub

    yield make
    for stub in made:
        stub.close()


def test_stub_handshake_consumes_initial_stop(fake: Callable[..., FakeStub]) -> None:
    srv = fake(greeting=raw_frame(b"T02thread:01;"))
    with GdbStub(request_timeout=2) as gdb:
        gdb.connect(srv.path, timeout=2)
        assert gdb.initial_stop is not None and gdb.initial_stop.signal == 2
        assert gdb.stop_reply is gdb.initial_stop
        assert not gdb.no_ack and gdb.features.packet_size == 0x1000
        assert gdb.read_registers().rip == 0xFFF0
    assert srv.requests[0].startswith(b"qSupported")
    assert b"?" not in srv.requests  # the initial stop made '?' unnecessary


def test_stub_no_ack_mode(fake: Callable[..., FakeStub]) -> None:
    srv = fake(no_ack_ok=True)
    with GdbStub(request_timeout=2) as gdb:
        gdb.connect(str(srv.path), timeout=2)
        assert gdb.no_ack
        assert gdb.stop_reply == parse_stop_reply(b"S05")
        before = len(srv.raw_in)
        gdb.read_registers()
        # after the ack owed for QStartNoAckMode's OK, no more '+' from us
        time.sleep(0.05)
        assert bytes(srv.raw_in[before:]) in (b"+$g#67", b"$g#67")
        before = len(srv.raw_in)
        gdb.read_registers()
        time.sleep(0.05)
        assert srv.raw_in[before:] == b"$g#67"


def test_stub_acks_ride_with_next_request(fake: Callable[..., FakeStub]) -> None:
    srv = fake()
    with GdbStub(request_timeout=2) as gdb:
        gdb.connect(srv.path, timeout=2)
        before = len(srv.raw_in)
        gdb.read_registers()
        gdb.read_registers()
        time.sleep(0.05)
        assert srv.raw_in[before:] == b"+$g#67+$g#67"


def test_stub_retransmits_on_nak(fake: Callable[..., FakeStub]) -> None:
    naks = {"left": 2}

    def handler(stub: FakeStub, p: bytes) -> bytes | list[bytes] | None:
        if p == b"g" and naks["left"]:
            naks["left"] -= 1
            return [b"-"]
        return None

    srv = fake(handler)
    with GdbStub(request_timeout=2) as gdb:
        gdb.connect(srv.path, timeout=2)
        assert gdb.read_registers().cs == 0xF000
    assert srv.requests.count(b"g") == 3


def test_stub_naks_corrupt_reply(fake: Callable[..., FakeStub]) -> None:
    sent = {"n": 0}

    def handler(stub: FakeStub, p: bytes) -> bytes | list[bytes] | None:
        if p == b"g" and not sent["n"]:
            sent["n"] = 1
            good = hex_encode(G_BLOCK)
            stub.last_sent = frame(good)  # what a retransmission sends
            return [b"$" + good[:-1] + b"1#" + b"%02x" % checksum(good)]  # damaged in transit
        return None

    srv = fake(handler)
    with GdbStub(request_timeout=2) as gdb:
        gdb.connect(srv.path, timeout=2)
        assert gdb.read_registers().rip == 0xFFF0
    assert srv.requests.count(b"g") == 1
    assert b"-" in srv.raw_in


def test_stub_timeout_and_hint(fake: Callable[..., FakeStub]) -> None:
    srv = fake(lambda stub, p: [] if p.startswith(b"qSupported") else None)
    gdb = GdbStub()
    t = time.monotonic()
    with pytest.raises(GdbTimeout, match="one gdb client at a time"):
        gdb.connect(srv.path, timeout=0.3)
    assert time.monotonic() - t < 2
    assert not gdb.connected


def test_stub_request_timeout(fake: Callable[..., FakeStub]) -> None:
    srv = fake(lambda stub, p: [] if p == b"g" else None)
    with GdbStub(request_timeout=2) as gdb:
        gdb.connect(srv.path, timeout=2)
        t = time.monotonic()
        with pytest.raises(GdbTimeout, match="did not answer 'g' in time"):
            gdb.read_registers(timeout=0.2)
        assert time.monotonic() - t < 1
        assert not gdb.connected  # a late reply must not answer the next request


def test_stub_hangup(fake: Callable[..., FakeStub]) -> None:
    def handler(stub: FakeStub, p: bytes) -> bytes | list[bytes] | None:
        if p == b"g":
            assert stub.conn is not None
            stub.conn.shutdown(socket.SHUT_RDWR)
            return []
        return None

    srv = fake(handler)
    gdb = GdbStub(request_timeout=2)
    gdb.connect(srv.path, timeout=2)
    with pytest.raises(GdbConnectionError, match="closed the connection"):
        gdb.read_registers()
    assert not gdb.connected
    with pytest.raises(GdbStateError, match="not connected"):
        gdb.read_registers()


def test_stub_oversized_reply(fake: Callable[..., FakeStub]) -> None:
    srv = fake(lambda stub, p: [b"$" + b"0" * 5000] if p == b"g" else None)
    gdb = GdbStub(request_timeout=2, max_packet_size=4096)
    gdb.connect(srv.path, timeout=2)
    with pytest.raises(GdbPacketTooLarge):
        gdb.read_registers()
    assert not gdb.connected


def test_stub_connect_errors(tmp_path: Path) -> None:
    with pytest.raises(GdbConnectionError, match=r"nope\.sock"):
        GdbStub().connect(tmp_path / "nope.sock", timeout=1)
    # a TCP port nobody listens on
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with pytest.raises(GdbConnectionError, match=f"127.0.0.1:{port}"):
        GdbStub().connect(f"127.0.0.1:{port}", timeout=1)


def test_stub_running_guard_and_wait(fake: Callable[..., FakeStub]) -> None:
    srv = fake()
    with GdbStub(request_timeout=2) as gdb:
        gdb.connect(srv.path, timeout=2)
        with pytest.raises(GdbStateError, match="not running"):
            gdb.wait_stop(0.1)
        gdb.interrupt()  # not running: nothing sent
        gdb.cont()
        assert gdb.running
        with pytest.raises(GdbStateError, match="running"):
            gdb.read_registers()
        with pytest.raises(GdbTimeout):
            gdb.wait_stop(0.1)
        # console output before the stop reply is skipped
        srv.send(raw_frame(b"O" + hex_encode(b"hello\n")) + raw_frame(b"T05thread:01;watch:6000;"))
        stop = gdb.wait_stop(2)
        assert stop.watch_addr == 0x6000 and not gdb.running
        assert gdb.step().signal == 5


def test_stub_x_packet_and_escaping(fake: Callable[..., FakeStub]) -> None:
    srv = fake(x_ok=True)
    data = bytes(range(256)) * 20
    with GdbStub(request_timeout=2) as gdb:
        gdb.connect(srv.path, timeout=2)
        gdb.write_memory(0x1000, data)
        assert bytes(srv.memory[0x1000 + i] for i in range(len(data))) == data
        assert gdb.read_memory(0x1000, len(data)) == data
    assert not any(r.startswith(b"M") for r in srv.requests)


def test_stub_m_fallback_and_chunks(fake: Callable[..., FakeStub]) -> None:
    srv = fake()
    data = bytes(range(256)) * 20
    with GdbStub(request_timeout=2) as gdb:
        gdb.connect(srv.path, timeout=2)
        gdb.write_memory(0xFFF, data)
        assert gdb.read_memory(0xFFF, len(data)) == data
        with pytest.raises(GdbErrorReply, match=r"reading 16 bytes at 0x100000: E14 \(EFAULT"):
            gdb.read_memory(0xFFFF0, 32)
    xs = [r for r in srv.requests if r.startswith(b"X")]
    ms = [r for r in srv.requests if r.startswith(b"M")]
    assert len(xs) == 1  # probed once, then M only
    assert all(len(frame(r)) <= 0x1000 for r in ms)
    reads = [r for r in srv.requests if r.startswith(b"m")]
    assert all(int(r.split(b",")[1], 16) <= 2048 for r in reads)


def test_stub_write_registers_sends_only_changes(fake: Callable[..., FakeStub]) -> None:
    srv = fake()
    with GdbStub(request_timeout=2) as gdb:
        gdb.connect(srv.path, timeout=2)
        regs = gdb.read_registers()
        n = len(srv.requests)
        gdb.write_registers(replace(regs, rip=0x7000, r15=0xFFFF_FFFF_FFFF_FFFF))
        assert srv.requests[n:] == [b"Pf=ffffffffffffffff", b"P10=0070000000000000"]
        gdb.write_registers(regs.with_register("xmm1", 5))
        assert srv.requests[-1] == b"P32=05000000000000000000000000000000"
        gdb.write_register("eflags", 0x202)
        assert srv.requests[-1] == b"P11=02020000"
        after = gdb.read_registers()
        assert (after.rip, after.r15, after.eflags, after.xmm(1)) == (
            0x7000,
            0xFFFF_FFFF_FFFF_FFFF,
            0x202,
            5,
        )
        n = len(srv.requests)
        gdb.write_registers(after)  # nothing changed: no traffic
        assert len(srv.requests) == n
        # a hand-made block has no origin: the current one is read to diff against
        gdb.write_registers(replace(sample_registers(), rip=0x1234, origin=None))
        assert srv.requests[n] == b"g"


def test_stub_register_write_fallback_to_g(fake: Callable[..., FakeStub]) -> None:
    srv = fake(p_ok=False)
    with GdbStub(request_timeout=2) as gdb:
        gdb.connect(srv.path, timeout=2)
        with pytest.raises(GdbStateError, match="outside long mode"):
            gdb.write_register("rax", 1)
        srv.regs[228:236] = (0x500).to_bytes(8, "little")  # EFER.LME|LMA: 64-bit mode
        gdb.write_register("rax", 0x42)
        assert srv.requests[-1].startswith(b"G") and len(srv.requests[-1]) == 1217
        assert gdb.read_registers().rax == 0x42
        with pytest.raises(GdbUnsupported):
            gdb.read_register("rax")


def test_stub_monitor_and_errors(fake: Callable[..., FakeStub]) -> None:
    def handler(stub: FakeStub, p: bytes) -> bytes | list[bytes] | None:
        if p.startswith(b"qRcmd,"):
            assert bytes.fromhex(p[6:].decode()) == b"info status"
            return [
                raw_frame(b"O" + hex_encode(b"VM status: ")),
                raw_frame(b"O" + hex_encode(b"paused\r\n")),
                raw_frame(b"OK"),
            ]
        if p.startswith(b"Hg"):
            return b"E22"
        if p.startswith(b"Z0"):
            return b""
        return None

    srv = fake(handler)
    with GdbStub(request_timeout=2) as gdb:
        gdb.connect(srv.path, timeout=2)
        assert gdb.query_monitor("info status") == "VM status: paused\r\n"
        with pytest.raises(GdbErrorReply, match="selecting thread 5") as info:
            gdb.select_thread(5)
        assert info.value.code == 0x22
        with pytest.raises(GdbUnsupported, match="Z0,1000,1"):
            gdb.insert_breakpoint(0x1000)
        with pytest.raises(ValueError):
            gdb.read_memory(-1, 4)
        with pytest.raises(ValueError, match="GdbStub method"):
            gdb.request(b"c")
        with pytest.raises(ValueError):
            gdb.insert_watchpoint(0x1000, 0)
        gdb.detach()
        assert not gdb.connected


def test_stub_refuses_other_architectures(fake: Callable[..., FakeStub]) -> None:
    def handler(stub: FakeStub, p: bytes) -> bytes | list[bytes] | None:
        if p.startswith(b"qXfer:features:read:target.xml:"):
            return b"l<target><architecture>aarch64</architecture></target>"
        return None

    srv = fake(handler)
    with pytest.raises(GdbProtocolError, match="aarch64"):
        GdbStub().connect(srv.path, timeout=2)


def test_detach_in_multiprocess_mode_names_the_process(fake: Callable[..., FakeStub]) -> None:
    """Stop replies in ``pX.Y`` form: detach is ``D;X`` (a plain D would get E22)."""

    def mp(srv: FakeStub, p: bytes) -> bytes | None:
        if p == b"D":
            return b"E22"
        if p.startswith(b"D;"):
            return b"OK"
        return None

    srv = fake(mp, greeting=raw_frame(b"T02thread:p01.01;"))
    gdb = GdbStub(request_timeout=2)
    gdb.connect(srv.path, timeout=2)
    assert gdb.multiprocess_pid == 1
    gdb.detach()
    assert srv.requests[-1] == b"D;1" and b"D" not in srv.requests
    assert not gdb.connected


def test_detach_retries_with_pid_after_e22(fake: Callable[..., FakeStub]) -> None:
    """Multiprocess mode not visible in any reply: E22 to D, then D;1."""
    srv = fake(lambda s, p: b"E22" if p == b"D" else (b"OK" if p == b"D;1" else None))
    gdb = GdbStub(request_timeout=2)
    gdb.connect(srv.path, timeout=2)
    assert gdb.multiprocess_pid is None
    gdb.detach()
    assert srv.requests[-2:] == [b"D", b"D;1"]


def test_detach_error_is_raised_not_swallowed(fake: Callable[..., FakeStub]) -> None:
    srv = fake(lambda s, p: b"E01" if p.startswith(b"D") else None)
    gdb = GdbStub(request_timeout=2)
    gdb.connect(srv.path, timeout=2)
    with pytest.raises(GdbError):
        gdb.detach()


def test_await_external_resume_takes_the_next_stop_unasked(fake: Callable[..., FakeStub]) -> None:
    """After a pause the VM is resumed through QMP, not by us: the next stop reply
    arrives unsolicited and is collected by wait_stop; nothing is sent meanwhile."""
    srv = fake()
    with GdbStub(request_timeout=2) as gdb:
        gdb.connect(srv.path, timeout=2)
        gdb.read_registers()
        gdb.await_external_resume()
        assert gdb.running
        sent = len(srv.raw_in)
        with pytest.raises(GdbTimeout):
            gdb.wait_stop(0.1)
        srv.send(raw_frame(b"T05thread:01;"))
        stop = gdb.wait_stop(2)
        assert stop.signal == 5 and not gdb.running
        assert bytes(srv.raw_in[sent:]).strip(b"+") == b""  # no request, no interrupt
        gdb.await_external_resume()
        gdb.assume_stopped()  # QMP says still paused: back to stopped, no reply owed
        assert not gdb.running
        assert gdb.read_registers().rip == 0xFFF0
