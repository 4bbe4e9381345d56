"""Codec for the GDB remote serial protocol, as spoken by QEMU's gdbstub (no I/O here).

Everything that turns bytes into meaning and back lives in this module, so it can be
tested (and fuzzed) without a socket: framing (``$payload#cs``, ``}`` escapes), an
incremental :class:`PacketReader` that accepts arbitrary received chunks, hex helpers,
stop replies, ``qSupported`` answers, ``Exx`` error replies, and the x86_64 register
file of QEMU's ``g`` packet (:class:`X86Registers`).

The peer is treated as untrusted: every malformed input ends in a :class:`GdbError`
subclass with a message naming the problem, and no input can make a buffer grow past
``max_packet_size`` (1 MiB by default).

The register layout is the one QEMU 7.2 describes in ``target.xml`` /
``i386-64bit.xml`` for an x86_64 target (checked against a live QEMU by the integration
tests): 66 registers, 608 bytes, in this order::

    rax rbx rcx rdx rsi rdi rbp rsp r8..r15   8 bytes each   regno 0..15
    rip                                         8              16
    eflags                                      4              17
    cs ss ds es fs gs (selectors)               4 each         18..23
    fs_base gs_base k_gs_base                   8 each         24..26
    cr0 cr2 cr3 cr4 cr8 efer                    8 each         27..32
    st0..st7                                    10 each        33..40
    fctrl fstat ftag fiseg fioff foseg fooff fop 4 each        41..48
    xmm0..xmm15                                 16 each        49..64
    mxcsr                                       4              65

QEMU always *reads* this full-width layout, whatever the vCPU mode. Its ``G`` handler,
however, consumes only 4 bytes for fs_base..efer unless the vCPU is in 64-bit mode
(CS.L=1 with EFER.LMA), so a ``G`` write-back outside 64-bit mode shifts every later
register (measured on QEMU 7.2: CR4 received CR0's value, FCW and MXCSR were zeroed).
"""

from __future__ import annotations

import binascii
import re
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field, fields, replace
from typing import Any, Final, Literal

from vmshield.errors import HypervisorError

MAX_PACKET_SIZE: Final = 1 << 20
"""Default cap on one packet, raw (between ``$`` and ``#``) and decoded."""

SIGINT: Final = 2
SIGTRAP: Final = 5

# --------------------------------------------------------------------------- errors


class GdbError(HypervisorError):
    """Base class of every failure of the gdbstub client and codec."""


class GdbProtocolError(GdbError):
    """The stub sent something that is not valid protocol (or not what was asked)."""


class GdbPacketTooLarge(GdbProtocolError):
    """A packet from the stub is longer than the configured cap."""


class GdbErrorReply(GdbError):
    """The stub answered a request with ``Exx`` (or ``E.text``)."""

    def __init__(
        self, request: bytes, code: int | None, text: str | None = None, context: str | None = None
    ) -> None:
        self.request = request
        self.code = code
        self.text = text
        what = context or f"request {_printable(request)!r}"
        detail = f"E{code:02x}" if code is not None else f"E.{text}"
        super().__init__(f"gdbstub refused {what}: {detail}{_errno_hint(code)}")


class GdbUnsupported(GdbError):
    """The stub answered a request with an empty packet: it does not implement it."""

    def __init__(self, request: bytes, hint: str = "") -> None:
        self.request = request
        super().__init__(
            f"gdbstub does not support request {_printable(request)!r}"
            + (f" ({hint})" if hint else "")
        )


class GdbTimeout(GdbError):
    """No (complete) answer arrived in time."""


class GdbConnectionError(GdbError):
    """The connection to the stub could not be opened, or broke."""


class GdbStateError(GdbError):
    """A call does not fit the session's state (not connected, or the vCPUs are running)."""


# QEMU writes errno values with decimal digits ("E14" is EFAULT, "E22" EINVAL), while the
# protocol reads them as hex: the hints are keyed by the hex value of those digits.
_ERRNO_HINTS: Final = {
    0x14: " (EFAULT: address not mapped for the selected vCPU)",
    0x22: " (EINVAL: bad argument, thread or size)",
}


def _errno_hint(code: int | None) -> str:
    return _ERRNO_HINTS.get(code, "") if code is not None else ""


def _printable(data: bytes, limit: int = 60) -> str:
    text = data[:limit].decode("ascii", "backslashreplace")
    return text + ("..." if len(data) > limit else "")


# --------------------------------------------------------------------------- hex


_HEX_RE: Final = re.compile(rb"[0-9a-fA-F]+")


def hex_encode(data: bytes) -> bytes:
    """``b"\\x01\\xab"`` -> ``b"01ab"``."""
    return binascii.hexlify(data)


def hex_decode(text: bytes, what: str = "hex data") -> bytes:
    """Strict inverse of :func:`hex_encode` (no whitespace, even length)."""
    try:
        return binascii.unhexlify(text)
    except (binascii.Error, ValueError):
        raise GdbProtocolError(f"{what} is not valid hex: {_printable(text)!r}") from None


def parse_hex_int(text: bytes, what: str = "number", max_digits: int = 32) -> int:
    """A big-endian hex number as used in packet headers (``1f`` -> 31)."""
    if not 0 < len(text) <= max_digits or _HEX_RE.fullmatch(text) is None:
        raise GdbProtocolError(f"{what} is not a hex number: {_printable(text)!r}")
    return int(text, 16)


# --------------------------------------------------------------------------- framing

_ESCAPE_RE: Final = re.compile(rb"[$#}*]")
_UNESCAPE_RE: Final = re.compile(rb"[}*]")


def _escape_one(m: re.Match[bytes]) -> bytes:
    return bytes((0x7D, m[0][0] ^ 0x20))


def escape_binary(data: bytes) -> bytes:
    """Escape ``$ # } *`` as ``}`` + (byte XOR 0x20), as binary packets need."""
    if _ESCAPE_RE.search(data) is None:
        return data
    return _ESCAPE_RE.sub(_escape_one, data)


def checksum(data: bytes) -> int:
    """The protocol checksum: the sum of the bytes modulo 256.

    Long inputs go through ``zlib.adler32`` in 256-byte slices: the low half of an
    Adler-32 is 1 + the byte sum modulo 65521, and 256 bytes sum to at most 65280, so
    each slice's sum comes out exact (~1 us instead of ~9 us for a 1216-byte reply).
    """
    n = len(data)
    if n <= 64:
        return sum(data) & 0xFF
    view = memoryview(data)
    total = 0
    for i in range(0, n, 256):
        total += (zlib.adler32(view[i : i + 256]) & 0xFFFF) - 1
    return total & 0xFF


_HEX_PAIRS: Final = {
    bytes((a, b)): int(bytes((a, b)), 16)
    for a in b"0123456789abcdefABCDEF"
    for b in b"0123456789abcdefABCDEF"
}


def frame(payload: bytes) -> bytes:
    """Frame one packet: ``$`` + escaped payload + ``#`` + two hex checksum digits."""
    body = escape_binary(payload)
    return b"$%b#%02x" % (body, checksum(body))


def decode_payload(raw: bytes, max_size: int = MAX_PACKET_SIZE) -> bytes:
    """Undo ``}`` escapes and ``*`` run-length encoding of a received packet body.

    ``X*c`` repeats the preceding (decoded) byte ``ord(c) - 29`` more times, with ``c``
    printable (``' '`` .. ``'~'``: 3..97 repeats); the count byte is never escaped.
    """
    if b"}" not in raw and b"*" not in raw:
        if len(raw) > max_size:
            raise GdbPacketTooLarge(f"packet of {len(raw)} bytes exceeds the {max_size} cap")
        return raw
    out = bytearray()
    pos = 0
    n = len(raw)
    for m in _UNESCAPE_RE.finditer(raw):
        i = m.start()
        if i < pos:  # the byte after '}' or the count after '*': already consumed
            continue
        out += raw[pos:i]
        if i + 1 >= n:
            raise GdbProtocolError(
                f"packet ends inside an escape or run: {_printable(raw[-20:])!r}"
            )
        nxt = raw[i + 1]
        if raw[i] == 0x7D:
            out.append(nxt ^ 0x20)
        else:
            if not out:
                raise GdbProtocolError("run-length '*' with nothing to repeat")
            if not 32 <= nxt <= 126:
                raise GdbProtocolError(f"invalid run-length count byte 0x{nxt:02x}")
            out += bytes((out[-1],)) * (nxt - 29)
        pos = i + 2
        if len(out) > max_size:
            raise GdbPacketTooLarge(f"decoded packet exceeds the {max_size} byte cap")
    out += raw[pos:]
    if len(out) > max_size:
        raise GdbPacketTooLarge(f"decoded packet exceeds the {max_size} byte cap")
    return bytes(out)


class Ack:
    """A ``+`` from the stub (it received our last packet intact)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "ACK"


class Nak:
    """A ``-`` from the stub (our last packet arrived corrupted: send it again)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NAK"


ACK: Final = Ack()
NAK: Final = Nak()


@dataclass(frozen=True, slots=True)
class Packet:
    """One received packet.

    ``payload`` is decoded (escapes and run-lengths expanded) when ``checksum_ok``; for a
    packet whose checksum does not match it is the raw body, to be NAKed, not used.
    ``notification`` marks ``%`` packets (non-stop notifications).
    """

    payload: bytes
    checksum_ok: bool = True
    notification: bool = False


Event = Ack | Nak | Packet

_IDLE_RE: Final = re.compile(rb"[-+$%]")


class PacketReader:
    """Incremental decoder: feed it received chunks of any size, get events back.

    Bytes outside packets other than ``+``/``-`` are discarded (like GDB does). A ``$``
    inside an unfinished packet restarts the packet there (resynchronisation after a
    truncated one). The buffer never holds more than ``max_packet_size + 3`` bytes: a
    longer packet raises :class:`GdbPacketTooLarge` and is dropped, so the reader can go
    on with the next one. A packet whose checksum does not match is returned with
    ``checksum_ok=False`` (the caller NAKs it); a valid one with a broken escape or
    run-length raises :class:`GdbProtocolError`. Events completed earlier in the same
    chunk are lost when ``feed`` raises: both errors are fatal for a session.
    """

    __slots__ = ("_buf", "_digits", "_in_packet", "_max", "_notification", "_seen_hash")

    def __init__(self, max_packet_size: int = MAX_PACKET_SIZE) -> None:
        if max_packet_size < 1:
            raise ValueError("max_packet_size must be positive")
        self._max = max_packet_size
        self._buf = bytearray()  # while in a packet: its body so far (after the '$')
        self._digits = b""  # checksum digits received so far (after the '#')
        self._in_packet = False
        self._seen_hash = False
        self._notification = False

    @property
    def buffered(self) -> int:
        """Bytes currently held for an unfinished packet."""
        return len(self._buf) + len(self._digits)

    @property
    def max_packet_size(self) -> int:
        return self._max

    def reset(self) -> None:
        """Forget any unfinished packet."""
        self._buf.clear()
        self._digits = b""
        self._in_packet = False
        self._seen_hash = False
        self._notification = False

    def feed(self, data: bytes) -> list[Event]:
        """Consume ``data``; return the events it completed, in order."""
        events: list[Event] = []
        pos = 0
        n = len(data)
        while pos < n:
            if not self._in_packet:
                m = _IDLE_RE.search(data, pos)
                if m is None:
                    break  # junk between packets: dropped
                c = data[m.start()]
                pos = m.start() + 1
                if c == 0x2B:
                    events.append(ACK)
                elif c == 0x2D:
                    events.append(NAK)
                else:
                    self.reset()
                    self._in_packet = True
                    self._notification = c == 0x25
                continue
            pos = self._feed_packet(data, pos, events)
        return events

    def _feed_packet(self, data: bytes, pos: int, events: list[Event]) -> int:
        buf = self._buf
        if not buf and not self._seen_hash:
            # Fast path: the whole packet is in this chunk (no copies into the buffer).
            end = data.find(b"#", pos)
            if 0 <= end <= len(data) - 3 and data.rfind(b"$", pos, end) < 0:
                if end - pos > self._max:
                    self.reset()
                    raise GdbPacketTooLarge(f"gdbstub packet exceeds {self._max} bytes")
                notification = self._notification
                self.reset()
                self._finish(data[pos:end], data[end + 1 : end + 3], notification, events)
                return end + 3
        if not self._seen_hash:
            end = data.find(b"#", pos)
            body_end = len(data) if end < 0 else end
            restart = data.rfind(b"$", pos, body_end)
            if restart >= 0:  # a new packet starts inside this one: drop the partial one
                buf.clear()
                self._notification = False
                pos = restart + 1
            if len(buf) + (body_end - pos) > self._max:
                self.reset()
                raise GdbPacketTooLarge(
                    f"gdbstub packet exceeds {self._max} bytes without a '#' terminator"
                )
            buf += data[pos:body_end]
            if end < 0:
                return len(data)
            self._seen_hash = True
            pos = end + 1
        need = 2 - len(self._digits)
        taken = data[pos : pos + need]
        self._digits += taken
        pos += len(taken)
        if len(self._digits) < 2:
            return pos
        body = bytes(buf)
        digits = self._digits
        notification = self._notification
        self.reset()
        self._finish(body, digits, notification, events)
        return pos

    def _finish(self, body: bytes, digits: bytes, notification: bool, events: list[Event]) -> None:
        if _HEX_PAIRS.get(digits) == checksum(body):
            events.append(Packet(decode_payload(body, self._max), True, notification))
        else:
            events.append(Packet(body, False, notification))


# --------------------------------------------------------------------------- replies


_ERROR_RE: Final = re.compile(rb"E([0-9a-fA-F]{2})")


def is_error_reply(payload: bytes) -> bool:
    return (len(payload) == 3 and _ERROR_RE.fullmatch(payload) is not None) or payload.startswith(
        b"E."
    )


def raise_for_error(payload: bytes, request: bytes, context: str | None = None) -> bytes:
    """Return ``payload`` unless it is an ``Exx`` / ``E.text`` reply, which is raised."""
    if payload[:1] == b"E":
        m = _ERROR_RE.fullmatch(payload)
        if m is not None:
            raise GdbErrorReply(request, int(m[1], 16), context=context)
        if payload.startswith(b"E."):
            text = payload[2:].decode("utf-8", "replace")
            raise GdbErrorReply(request, None, text, context=context)
    return payload


@dataclass(frozen=True, slots=True)
class StubFeatures:
    """The stub's answer to ``qSupported``."""

    packet_size: int | None = None
    features: dict[str, str | bool] = field(default_factory=dict)

    def supports(self, name: str) -> bool:
        value = self.features.get(name)
        return value is True or isinstance(value, str)

    def explicitly_unsupported(self, name: str) -> bool:
        return self.features.get(name) is False


def parse_qsupported(payload: bytes) -> StubFeatures:
    """``PacketSize=1000;qXfer:features:read+;foo-`` -> :class:`StubFeatures`."""
    feats: dict[str, str | bool] = {}
    packet_size: int | None = None
    if not payload:
        return StubFeatures()
    try:
        text = payload.decode("ascii")
    except UnicodeDecodeError:
        raise GdbProtocolError(f"qSupported reply is not ASCII: {_printable(payload)!r}") from None
    for item in text.split(";"):
        if not item:
            continue
        if "=" in item:
            name, value = item.split("=", 1)
            feats[name] = value
            if name == "PacketSize":
                packet_size = parse_hex_int(value.encode(), "qSupported PacketSize", 8)
        elif item[-1] in "+-?":
            feats[item[:-1]] = item[-1] != "-"
        else:
            raise GdbProtocolError(f"malformed qSupported item {item!r}")
    if packet_size is not None and packet_size < 64:
        raise GdbProtocolError(f"qSupported PacketSize={packet_size:#x} is implausibly small")
    return StubFeatures(packet_size, feats)


@dataclass(frozen=True, slots=True)
class ThreadId:
    """A thread id as in ``Hg``/``thread:`` (QEMU: one thread per vCPU, tid = index + 1).

    ``tid`` -1 means all threads, 0 any thread. ``pid`` is set in multiprocess syntax
    (``p01.02``).
    """

    tid: int
    pid: int | None = None

    def encode(self) -> bytes:
        t = b"-1" if self.tid == -1 else b"%x" % self.tid
        if self.pid is None:
            return t
        p = b"-1" if self.pid == -1 else b"%x" % self.pid
        return b"p%b.%b" % (p, t)


def _parse_thread_part(text: bytes) -> int:
    return -1 if text == b"-1" else parse_hex_int(text, "thread id", 16)


def parse_thread_id(text: bytes) -> ThreadId:
    """``01`` / ``-1`` / ``p01.02`` / ``p1`` -> :class:`ThreadId`."""
    if text.startswith(b"p"):
        pid_text, dot, tid_text = text[1:].partition(b".")
        pid = _parse_thread_part(pid_text)
        return ThreadId(_parse_thread_part(tid_text) if dot else -1, pid)
    return ThreadId(_parse_thread_part(text))


def parse_thread_list(payload: bytes) -> tuple[list[ThreadId], bool]:
    """One ``qfThreadInfo``/``qsThreadInfo`` answer -> (threads, this was the last)."""
    if payload == b"l":
        return [], True
    if not payload.startswith(b"m") or len(payload) < 2:
        raise GdbProtocolError(f"bad thread list reply {_printable(payload)!r}")
    return [parse_thread_id(t) for t in payload[1:].split(b",")], False


WatchKind = Literal["watch", "rwatch", "awatch"]
StopKind = Literal["signal", "exited", "terminated"]

_STOP_RE: Final = re.compile(rb"([STWX])([0-9a-fA-F]{2})(.*)", re.DOTALL)
_REASONS: Final = frozenset(
    {
        b"watch",
        b"rwatch",
        b"awatch",
        b"swbreak",
        b"hwbreak",
        b"library",
        b"replaylog",
        b"fork",
        b"vfork",
        b"vforkdone",
        b"exec",
        b"create",
        b"syscall_entry",
        b"syscall_return",
        b"no_resumed",
    }
)


@dataclass(frozen=True, slots=True)
class StopReply:
    """A parsed stop reply (``S05``, ``T05thread:01;watch:...;``, ``W00``, ``X09``).

    ``kind`` is "signal" for S/T (the target stopped: ``signal`` is the GDB signal
    number, 2 for an interrupt, 5 for a trap), "exited" for W (``exit_code``) and
    "terminated" for X (``signal``). ``watch_kind``/``watch_addr`` are set for a
    watchpoint hit; ``registers`` maps register numbers to their raw (target order)
    bytes; other ``key:value`` pairs end up in ``info``.
    """

    kind: StopKind
    signal: int | None = None
    exit_code: int | None = None
    thread: ThreadId | None = None
    core: int | None = None
    reason: str | None = None
    watch_kind: WatchKind | None = None
    watch_addr: int | None = None
    registers: dict[int, bytes] = field(default_factory=dict)
    info: dict[str, bytes] = field(default_factory=dict)
    raw: bytes = b""

    @property
    def stopped(self) -> bool:
        """The target is stopped (and still alive): False after an exit."""
        return self.kind == "signal"


def looks_like_stop_reply(payload: bytes) -> bool:
    return (
        len(payload) >= 3 and payload[:1] in b"ST" and _HEX_RE.fullmatch(payload[1:3]) is not None
    )


def parse_stop_reply(payload: bytes) -> StopReply:
    """Parse any stop reply; raise :class:`GdbProtocolError` for anything else."""
    m = _STOP_RE.fullmatch(payload)
    if m is None:
        raise GdbProtocolError(f"not a stop reply: {_printable(payload)!r}")
    letter, number, rest = m[1], int(m[2], 16), m[3]
    if letter == b"S":
        if rest:
            raise GdbProtocolError(f"trailing data in S stop reply: {_printable(payload)!r}")
        return StopReply("signal", signal=number, raw=payload)
    if letter in b"WX":
        info: dict[str, bytes] = {}
        if rest:
            if not rest.startswith(b";"):
                raise GdbProtocolError(f"malformed exit reply {_printable(payload)!r}")
            for item in rest[1:].split(b";"):
                key, colon, value = item.partition(b":")
                if not colon:
                    raise GdbProtocolError(f"malformed exit reply {_printable(payload)!r}")
                info[key.decode("ascii", "replace")] = value
        if letter == b"W":
            return StopReply("exited", exit_code=number, info=info, raw=payload)
        return StopReply("terminated", signal=number, info=info, raw=payload)
    thread: ThreadId | None = None
    core: int | None = None
    reason: str | None = None
    watch_kind: WatchKind | None = None
    watch_addr: int | None = None
    regs: dict[int, bytes] = {}
    extra: dict[str, bytes] = {}
    for item in rest.split(b";"):
        if not item:
            continue
        key, colon, value = item.partition(b":")
        if not colon:
            raise GdbProtocolError(f"stop reply item without ':' : {_printable(item)!r}")
        if key == b"thread":
            thread = parse_thread_id(value)
        elif key == b"core":
            core = parse_hex_int(value, "stop reply core")
        elif key in (b"watch", b"rwatch", b"awatch"):
            watch_kind = "watch" if key == b"watch" else "rwatch" if key == b"rwatch" else "awatch"
            watch_addr = parse_hex_int(value, "watchpoint address", 16)
            reason = watch_kind
        elif key in _REASONS:
            reason = key.decode("ascii")
            extra[reason] = value
        elif _HEX_RE.fullmatch(key) is not None and len(key) <= 4:
            regs[int(key, 16)] = hex_decode(value, f"register {key.decode()} in stop reply")
        else:
            extra[key.decode("ascii", "backslashreplace")] = value
    return StopReply(
        "signal",
        signal=number,
        thread=thread,
        core=core,
        reason=reason,
        watch_kind=watch_kind,
        watch_addr=watch_addr,
        registers=regs,
        info=extra,
        raw=payload,
    )


# --------------------------------------------------------------------------- x86_64


@dataclass(frozen=True, slots=True)
class RegisterInfo:
    """One register of the ``g`` packet: its GDB number, byte offset and size."""

    name: str
    regno: int
    offset: int
    size: int


def _build_layout() -> tuple[RegisterInfo, ...]:
    spec: list[tuple[str, int]] = [
        *((n, 8) for n in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp")),
        *((f"r{i}", 8) for i in range(8, 16)),
        ("rip", 8),
        ("eflags", 4),
        *((n, 4) for n in ("cs", "ss", "ds", "es", "fs", "gs")),
        *((n, 8) for n in ("fs_base", "gs_base", "k_gs_base")),
        *((n, 8) for n in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer")),
        *((f"st{i}", 10) for i in range(8)),
        *((n, 4) for n in ("fctrl", "fstat", "ftag", "fiseg", "fioff", "foseg", "fooff", "fop")),
        *((f"xmm{i}", 16) for i in range(16)),
        ("mxcsr", 4),
    ]
    out: list[RegisterInfo] = []
    offset = 0
    for regno, (name, size) in enumerate(spec):
        out.append(RegisterInfo(name, regno, offset, size))
        offset += size
    return tuple(out)


X86_64_REGISTERS: Final = _build_layout()
"""The 66 registers of QEMU's x86_64 ``g`` packet, in order."""

X86_64_G_SIZE: Final = 608
CORE_REGISTER_COUNT: Final = 33  # rax .. efer: the named fields of X86Registers
TAIL_OFFSET: Final = 236  # where st0 starts
TAIL_SIZE: Final = X86_64_G_SIZE - TAIL_OFFSET

_BY_NAME: Final = {r.name: r for r in X86_64_REGISTERS}
_CORE: Final = struct.Struct("<16QQI6I3Q6Q")
assert _CORE.size == TAIL_OFFSET
assert X86_64_REGISTERS[-1].offset + X86_64_REGISTERS[-1].size == X86_64_G_SIZE


def register_info(name: str) -> RegisterInfo:
    """Look a register up by its GDB name (``rip``, ``fs_base``, ``xmm3``, ``mxcsr``)."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown x86_64 register {name!r}") from None


def _int_to_reg(info: RegisterInfo, value: int) -> bytes:
    if not 0 <= value < 1 << (8 * info.size):
        raise ValueError(f"value {value:#x} does not fit register {info.name} ({info.size} bytes)")
    return value.to_bytes(info.size, "little")


def encode_register(info: RegisterInfo, value: int | bytes) -> bytes:
    """A register value in target byte order (``int`` little-endian, or exact bytes)."""
    if isinstance(value, bytes):
        if len(value) != info.size:
            raise ValueError(f"register {info.name} takes {info.size} bytes, got {len(value)}")
        return value
    return _int_to_reg(info, value)


@dataclass(slots=True)
class X86Registers:
    """The x86_64 register file of one vCPU, as QEMU's ``g`` packet reports it.

    Segment fields are selectors. ``tail`` keeps the x87/SSE part (st0..st7, fctrl..fop,
    xmm0..xmm15, mxcsr: 372 bytes) verbatim so :meth:`to_g_payload` reproduces a ``g``
    reply byte for byte. ``origin`` holds the 608 bytes this object was parsed from
    (``dataclasses.replace`` carries it along), so a writer can send only what changed.

    Mutable on purpose (``regs.rip = addr``, then write it back): a frozen dataclass
    made every ``g`` parse three times slower (its ``__init__`` goes through
    ``object.__setattr__`` 35 times).
    """

    rax: int
    rbx: int
    rcx: int
    rdx: int
    rsi: int
    rdi: int
    rbp: int
    rsp: int
    r8: int
    r9: int
    r10: int
    r11: int
    r12: int
    r13: int
    r14: int
    r15: int
    rip: int
    eflags: int
    cs: int
    ss: int
    ds: int
    es: int
    fs: int
    gs: int
    fs_base: int
    gs_base: int
    k_gs_base: int
    cr0: int
    cr2: int
    cr3: int
    cr4: int
    cr8: int
    efer: int
    tail: bytes = bytes(TAIL_SIZE)
    origin: bytes | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if len(self.tail) != TAIL_SIZE:
            raise ValueError(f"x87/SSE tail must be {TAIL_SIZE} bytes, got {len(self.tail)}")

    @classmethod
    def from_bytes(cls, raw: bytes) -> X86Registers:
        """Parse the 608 binary bytes of a ``g`` reply."""
        if len(raw) != X86_64_G_SIZE:
            raise GdbProtocolError(
                f"x86_64 register block is {len(raw)} bytes, expected {X86_64_G_SIZE} "
                "(QEMU x86_64 layout: 16 GPRs, rip, eflags, 6 selectors, 3 bases, "
                "6 control registers, x87, xmm0-15, mxcsr)"
            )
        values: tuple[Any, ...] = (*_CORE.unpack_from(raw), raw[TAIL_OFFSET:], raw)
        return cls(*values)

    def to_bytes(self) -> bytes:
        """The 608-byte binary register block (``g`` layout)."""
        values = [getattr(self, r.name) for r in X86_64_REGISTERS[:CORE_REGISTER_COUNT]]
        try:
            core = _CORE.pack(*values)
        except struct.error:
            for r, v in zip(X86_64_REGISTERS, values, strict=False):
                _int_to_reg(r, v)  # raises the precise ValueError
            raise
        return core + self.tail

    def to_g_payload(self) -> bytes:
        """The hex text of a ``g`` reply (what a ``G`` packet carries)."""
        return binascii.hexlify(self.to_bytes())

    def raw_register(self, name: str) -> bytes:
        """Any register's bytes in target order (also x87/SSE ones from the tail)."""
        info = register_info(name)
        if info.regno < CORE_REGISTER_COUNT:
            return _int_to_reg(info, getattr(self, name))
        start = info.offset - TAIL_OFFSET
        return self.tail[start : start + info.size]

    def value(self, name: str) -> int:
        """Any register as an unsigned integer (st/xmm registers too, little-endian)."""
        info = register_info(name)
        if info.regno < CORE_REGISTER_COUNT:
            v: int = getattr(self, name)
            return v
        return int.from_bytes(self.raw_register(name), "little")

    def with_register(self, name: str, value: int | bytes) -> X86Registers:
        """A copy with one register (core or tail) changed."""
        info = register_info(name)
        data = encode_register(info, value)
        if info.regno < CORE_REGISTER_COUNT:
            changes: dict[str, Any] = {name: int.from_bytes(data, "little")}
            return replace(self, **changes)
        start = info.offset - TAIL_OFFSET
        tail = self.tail[:start] + data + self.tail[start + info.size :]
        return replace(self, tail=tail)

    def xmm(self, index: int) -> int:
        return self.value(f"xmm{index}")

    @property
    def mxcsr(self) -> int:
        return self.value("mxcsr")

    def changed_registers(self, base: bytes | None = None) -> list[RegisterInfo]:
        """Registers whose bytes differ from ``base`` (default: :attr:`origin`).

        Without any base every register counts as changed.
        """
        ref = self.origin if base is None else base
        current = self.to_bytes()
        if ref is None:
            return list(X86_64_REGISTERS)
        if len(ref) != X86_64_G_SIZE:
            raise ValueError(f"base register block must be {X86_64_G_SIZE} bytes")
        if ref == current:
            return []
        return [
            r
            for r in X86_64_REGISTERS
            if current[r.offset : r.offset + r.size] != ref[r.offset : r.offset + r.size]
        ]

    def gprs(self) -> dict[str, int]:
        """The 16 general purpose registers by name."""
        return {r.name: getattr(self, r.name) for r in X86_64_REGISTERS[:16]}


_FIELD_NAMES: Final = tuple(f.name for f in fields(X86Registers))
assert _FIELD_NAMES[:CORE_REGISTER_COUNT] == tuple(
    r.name for r in X86_64_REGISTERS[:CORE_REGISTER_COUNT]
)


def parse_g_reply(payload: bytes) -> X86Registers:
    """Parse the hex text of a ``g`` reply into :class:`X86Registers`."""
    if len(payload) != 2 * X86_64_G_SIZE:
        raise GdbProtocolError(
            f"'g' reply is {len(payload)} hex digits, expected {2 * X86_64_G_SIZE} "
            f"({X86_64_G_SIZE} bytes: QEMU's x86_64 register layout); "
            f"starts {_printable(payload, 24)!r}"
        )
    return X86Registers.from_bytes(hex_decode(payload, "'g' reply"))


def memory_chunks(
    addr: int, size: int, limit: int, boundary: int = 4096
) -> Iterator[tuple[int, int]]:
    """Split ``[addr, addr+size)`` into ``(addr, length)`` pieces of at most ``limit`` bytes
    that never cross a ``boundary`` (page) edge, so a failure names the page it is in."""
    if limit < 1:
        raise ValueError("chunk limit must be positive")
    end = addr + size
    while addr < end:
        n = min(limit, end - addr, boundary - addr % boundary)
        yield addr, n
        addr += n
