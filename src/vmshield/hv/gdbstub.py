"""Client for QEMU's gdbstub: the one class that owns the GDB remote protocol socket.

:class:`GdbStub` drives an x86_64 QEMU (measured against QEMU 7.2, TCG) in all-stop
mode: registers, memory (virtual addresses as the selected vCPU sees them), software
breakpoints, watchpoints, continue / step / interrupt, vCPU (thread) selection, detach
and monitor commands. Every call has a deadline; none can block forever.

Session rules, as QEMU implements them:

* One client at a time. Connecting stops the VM; if it was running QEMU announces that
  with a ``T02`` stop reply, which the handshake consumes (:attr:`GdbStub.stop_reply`).
  A second client's connection is accepted by the kernel but never answered (it ends
  in :class:`GdbTimeout`). Closing the socket without :meth:`GdbStub.detach` leaves the
  VM paused.
* While the VM runs, QEMU takes *any* received byte as an interrupt request and throws
  the packet away, so :class:`GdbStub` refuses requests between :meth:`GdbStub.cont`
  and the matching :meth:`GdbStub.wait_stop` (:class:`GdbStateError`).
* ``p``/``P`` answer empty until the client has read ``target.xml``: the handshake
  reads it (and checks the architecture is ``i386:x86-64``).
* ``G`` is only correct in 64-bit mode (see :mod:`vmshield.hv.gdbpackets`), so
  :meth:`GdbStub.write_registers` sends one ``P`` per changed register instead.
* ``c`` from an address with a breakpoint re-reports that breakpoint without executing
  anything (``s`` steps over it): :meth:`GdbStub.cont` steps off first, like GDB.
* After every stop QEMU points register access and stepping at the vCPU named in the
  stop reply (an interrupt may name any vCPU), whatever ``Hg``/``Hc`` said before.
* No ``X`` packet (binary write) and no ``QStartNoAckMode`` in 7.2: both are probed and
  used when a stub offers them. Memory packets are limited by ``PacketSize`` (0x1000:
  2048 bytes per ``m``, an ``M`` longer than 4096 characters is silently dropped).
* Acks: QEMU does not wait for our ``+`` before reading on, so the ack of a reply is
  sent in the same write as the next request (measured: ``g`` round trip ~83 us instead
  of ~102 us over a Unix socket). While a reply is unacknowledged QEMU swallows a 0x03
  instead of stopping; every resume request carries the owed acks, so an interrupt
  never meets that state.

Not thread-safe, except :meth:`GdbStub.interrupt`, which may be called from another
thread while one waits in :meth:`GdbStub.wait_stop`.
"""

from __future__ import annotations

import math
import os
import re
import select
import socket
import time
from collections import deque
from types import TracebackType
from typing import Final, Literal

from vmshield.hv.gdbpackets import (
    MAX_PACKET_SIZE,
    SIGINT,
    SIGTRAP,
    Ack,
    Event,
    GdbConnectionError,
    GdbError,
    GdbErrorReply,
    GdbPacketTooLarge,
    GdbProtocolError,
    GdbStateError,
    GdbTimeout,
    GdbUnsupported,
    Nak,
    PacketReader,
    RegisterInfo,
    StopReply,
    StubFeatures,
    ThreadId,
    X86Registers,
    encode_register,
    frame,
    hex_decode,
    hex_encode,
    looks_like_stop_reply,
    memory_chunks,
    parse_g_reply,
    parse_qsupported,
    parse_stop_reply,
    parse_thread_id,
    parse_thread_list,
    raise_for_error,
    register_info,
)

__all__ = [
    "SIGINT",
    "SIGTRAP",
    "GdbConnectionError",
    "GdbError",
    "GdbErrorReply",
    "GdbPacketTooLarge",
    "GdbProtocolError",
    "GdbStateError",
    "GdbStub",
    "GdbTimeout",
    "GdbUnsupported",
    "StopReply",
    "ThreadId",
    "WatchAccess",
    "X86Registers",
]

WatchAccess = Literal["write", "read", "access"]
_WATCH_TYPE: Final = {"write": 2, "read": 3, "access": 4}

DEFAULT_PACKET_SIZE: Final = 1024  # when the stub does not say (GDB assumes less)
_QSUPPORTED: Final = b"qSupported:xmlRegisters=i386;vContSupported+"
_MAX_RETRANSMITS: Final = 5
_MAX_THREAD_PAGES: Final = 4096
_MAX_XFER: Final = 1 << 20
_RECV_SIZE: Final = 65536
_EFER_LMA: Final = 1 << 10
_HOSTPORT_RE: Final = re.compile(r"(?:tcp:)?(\[[^\]]+\]|[^:/\[\]]+):(\d{1,5})")

Address = str | os.PathLike[str] | tuple[str, int]


def _printable(data: bytes) -> str:
    text = data[:40].decode("ascii", "backslashreplace")
    return text + ("..." if len(data) > 40 else "")


def _describe(address: Address) -> str:
    if isinstance(address, tuple):
        return f"{address[0]}:{address[1]}"
    return os.fspath(address)


class GdbStub:
    """One gdbstub session (all-stop, x86_64 QEMU).

    ``request_timeout`` bounds every request/reply exchange that has no explicit
    timeout argument. Use as a context manager to close the socket on exit (which leaves
    the VM as it is: paused if stopped; call :meth:`detach` to let it run on).
    """

    def __init__(
        self, *, request_timeout: float = 5.0, max_packet_size: int = MAX_PACKET_SIZE
    ) -> None:
        if request_timeout <= 0:
            raise ValueError("request_timeout must be positive")
        self.request_timeout = request_timeout
        self._reader = PacketReader(max_packet_size)
        self._events: deque[Event] = deque()
        self._sock: socket.socket | None = None
        self._poller: select.poll | None = None
        self._where = ""
        self._no_ack = False
        self._acks_owed = 0
        self._last_frame = b""
        self._running = False
        self._stop: StopReply | None = None
        self._initial_stop: StopReply | None = None
        self._features = StubFeatures()
        self._read_chunk = DEFAULT_PACKET_SIZE // 2
        self._write_chunk = (DEFAULT_PACKET_SIZE - 48) // 2
        self._x_supported: bool | None = None
        self._p_supported: bool | None = None
        self._vcont_step: bool | None = None
        self._breakpoints: dict[int, int] = {}  # Z0/Z1 address -> insert count
        self._g_thread: int | None = None  # Hg choice since the last stop (None: stop thread)
        self._stop_pc: int | None = None  # rip of the stop thread, when already read
        self._pending_stop: StopReply | None = None  # produced while stepping off a breakpoint
        self._watch_hangover = False  # the last stop was a watchpoint hit (see cont/step)
        self._mp_pid: int | None = None  # multiprocess pid seen in a qC/thread-list reply

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> GdbStub:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def connect(self, address: Address, timeout: float = 5.0) -> None:
        """Connect and handshake.

        ``address`` is a Unix socket path, ``"host:port"`` (also ``"tcp:host:port"``,
        ``"[::1]:port"``), ``"unix:PATH"`` or a ``(host, port)`` tuple. ``timeout``
        covers the connection and the whole handshake.
        """
        if self._sock is not None:
            raise GdbStateError(f"already connected to {self._where}")
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        deadline = time.monotonic() + timeout
        self._where = _describe(address)
        sock = self._open(address, timeout)
        sock.setblocking(False)
        self._sock = sock
        self._poller = select.poll()
        self._poller.register(sock.fileno(), select.POLLIN | select.POLLERR | select.POLLHUP)
        self._reader.reset()
        self._events.clear()
        self._no_ack = False
        self._acks_owed = 0
        self._running = False
        self._stop = self._initial_stop = None
        self._mp_pid = None
        self._x_supported = self._p_supported = self._vcont_step = None
        self._forget_stop_state()
        try:
            self._handshake(deadline)
        except BaseException:
            self.close()
            raise

    def _open(self, address: Address, timeout: float) -> socket.socket:
        target: str | tuple[str, int]
        if isinstance(address, tuple):
            target = address
        else:
            text = os.fspath(address)
            m = _HOSTPORT_RE.fullmatch(text)
            if text.startswith("unix:"):
                target = text[5:]
            elif m is not None and not os.path.exists(text):
                target = (m[1].strip("[]"), int(m[2]))
            else:
                target = text
        if isinstance(target, str):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(timeout)
                sock.connect(target)
            except TimeoutError:
                sock.close()
                raise GdbTimeout(f"connecting to gdbstub socket {self._where} timed out") from None
            except OSError as e:
                sock.close()
                raise GdbConnectionError(
                    f"cannot connect to gdbstub socket {self._where}: {e.strerror or e}"
                ) from None
            return sock
        try:
            sock = socket.create_connection(target, timeout=timeout)
        except TimeoutError:
            raise GdbTimeout(f"connecting to gdbstub at {self._where} timed out") from None
        except OSError as e:
            raise GdbConnectionError(
                f"cannot connect to gdbstub at {self._where}: {e.strerror or e}"
            ) from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def _handshake(self, deadline: float) -> None:
        try:
            self._send(_QSUPPORTED, deadline)
            reply = self._read_packet(deadline)
            while looks_like_stop_reply(reply):
                # QEMU stopped a running VM because we connected: "T02thread:01;".
                self._initial_stop = self._stop = parse_stop_reply(reply)
                reply = self._read_packet(deadline)
        except GdbTimeout:
            raise GdbTimeout(
                f"gdbstub at {self._where} did not answer qSupported in time (QEMU serves "
                "one gdb client at a time: is another debugger attached?)"
            ) from None
        self._features = parse_qsupported(raise_for_error(reply, _QSUPPORTED))
        size = self._features.packet_size or DEFAULT_PACKET_SIZE
        size = min(size, self._reader.max_packet_size)
        # 'm' replies carry 2 hex digits per byte; QEMU refuses more than PacketSize/2.
        self._read_chunk = max(1, size // 2)
        # An 'M' request must fit the stub's input buffer with its header.
        self._write_chunk = max(1, (size - 48) // 2)
        if (
            not self._features.explicitly_unsupported("QStartNoAckMode")
            and self._request(b"QStartNoAckMode", deadline) == b"OK"
        ):
            self._no_ack = True
        if self._features.supports("qXfer:features:read"):
            xml = self._read_xfer(b"features", b"target.xml", deadline)
            arch = re.search(rb"<architecture>\s*([^<\s]+)\s*</architecture>", xml)
            if arch is not None and arch[1] != b"i386:x86-64":
                raise GdbProtocolError(
                    f"gdbstub at {self._where} is a {arch[1].decode(errors='replace')} "
                    "target, vmshield needs i386:x86-64"
                )
        if self._stop is None:
            reply = raise_for_error(self._request(b"?", deadline), b"?")
            self._stop = parse_stop_reply(reply)

    def _forget_stop_state(self) -> None:
        self._breakpoints.clear()
        self._g_thread = None
        self._stop_pc = None
        self._pending_stop = None
        self._watch_hangover = False

    def fileno(self) -> int:
        """The connected socket's descriptor (for :mod:`vmshield.hv.gdbguard` to hold)."""
        if self._sock is None:
            raise GdbConnectionError("not connected")
        return self._sock.fileno()

    def close(self) -> None:
        """Close the socket (idempotent). The VM stays as it is."""
        sock, self._sock = self._sock, None
        self._poller = None
        self._running = False
        self._forget_stop_state()
        self._events.clear()
        self._reader.reset()
        if sock is not None:
            sock.close()

    @property
    def connected(self) -> bool:
        return self._sock is not None

    @property
    def running(self) -> bool:
        """True between a resume (:meth:`cont`, :meth:`step`) and its stop reply."""
        return self._running

    @property
    def no_ack(self) -> bool:
        """The stub agreed to ``QStartNoAckMode`` (QEMU 7.2 does not)."""
        return self._no_ack

    @property
    def features(self) -> StubFeatures:
        return self._features

    @property
    def stop_reply(self) -> StopReply | None:
        """The latest stop reply (after connect: the initial one, or the answer to ``?``)."""
        return self._stop

    @property
    def initial_stop(self) -> StopReply | None:
        """The stop reply QEMU sent on connect because the VM was running, if any."""
        return self._initial_stop

    # ------------------------------------------------------------------ transport

    def _deadline(self, timeout: float | None) -> float:
        t = self.request_timeout if timeout is None else timeout
        if not t > 0:
            raise ValueError("timeout must be positive")
        return time.monotonic() + t

    def _sock_or_raise(self) -> socket.socket:
        if self._sock is None:
            raise GdbStateError("not connected to a gdbstub")
        return self._sock

    def _send_raw(self, data: bytes, deadline: float) -> None:
        sock = self._sock_or_raise()
        view = memoryview(data)
        while view:
            try:
                sent = sock.send(view)
            except BlockingIOError:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise GdbTimeout(f"sending to gdbstub at {self._where} timed out") from None
                select.select([], [sock], [], remaining)
                continue
            except OSError as e:
                self.close()
                raise GdbConnectionError(
                    f"connection to gdbstub at {self._where} broke: {e.strerror or e}"
                ) from None
            view = view[sent:]

    def _send(self, payload: bytes, deadline: float) -> None:
        framed = frame(payload)
        self._last_frame = framed
        if self._acks_owed:
            self._send_raw(b"+" * self._acks_owed + framed, deadline)
            self._acks_owed = 0
        else:
            self._send_raw(framed, deadline)

    def _flush_acks(self, deadline: float) -> None:
        # Only while QEMU has an unacknowledged reply: then a '+' is taken as the ack.
        # Any other byte reaching a running VM would stop it.
        if self._acks_owed:
            self._send_raw(b"+" * self._acks_owed, deadline)
            self._acks_owed = 0

    def _fill(self, deadline: float) -> None:
        sock = self._sock_or_raise()
        assert self._poller is not None
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not self._poller.poll(math.ceil(remaining * 1000)):
            raise GdbTimeout(f"no answer from gdbstub at {self._where} in time")
        try:
            data = sock.recv(_RECV_SIZE)
        except BlockingIOError:
            return
        except OSError as e:
            self.close()
            raise GdbConnectionError(
                f"connection to gdbstub at {self._where} broke: {e.strerror or e}"
            ) from None
        if not data:
            self.close()
            raise GdbConnectionError(f"gdbstub at {self._where} closed the connection")
        try:
            self._events.extend(self._reader.feed(data))
        except GdbProtocolError:
            self.close()
            raise

    def _read_packet(self, deadline: float) -> bytes:
        """The next packet's payload, handling acks, NAKs and corrupt packets."""
        naks = corrupt = 0
        events = self._events
        while True:
            if not events:
                self._fill(deadline)
                continue
            ev = events.popleft()
            if isinstance(ev, Ack):
                continue
            if isinstance(ev, Nak):
                if self._no_ack or not self._last_frame:
                    continue
                naks += 1
                if naks > _MAX_RETRANSMITS:
                    raise GdbProtocolError(
                        f"gdbstub at {self._where} rejected our packet {naks} times"
                    )
                self._send_raw(self._last_frame, deadline)
                continue
            if not ev.checksum_ok:
                if self._no_ack:
                    self.close()
                    raise GdbProtocolError(
                        f"packet with a bad checksum from gdbstub at {self._where} (no-ack mode)"
                    )
                corrupt += 1
                if corrupt > _MAX_RETRANSMITS:
                    raise GdbProtocolError(
                        f"gdbstub at {self._where} sent {corrupt} corrupt packets in a row"
                    )
                self._send_raw(b"-", deadline)
                continue
            if not self._no_ack:
                self._acks_owed += 1  # sent with our next packet: one write, one wakeup
            if ev.notification:
                continue  # non-stop notifications: not used in all-stop mode
            return ev.payload

    def _request(self, payload: bytes, deadline: float) -> bytes:
        if self._running:
            raise GdbStateError(
                "the VM is running: call interrupt() and wait_stop() before sending requests"
            )
        self._send(payload, deadline)
        try:
            return self._read_packet(deadline)
        except GdbTimeout:
            # A late answer would be taken for the next request's: the session is over.
            self.close()
            raise GdbTimeout(
                f"gdbstub at {self._where} did not answer {_printable(payload)!r} in time "
                "(connection closed)"
            ) from None

    def request(self, payload: bytes, timeout: float | None = None) -> bytes:
        """Send one raw request and return the reply payload (``Exx`` is raised).

        For queries and settings only: resuming (``c``, ``s``, ``vCont``...) and
        detaching have their own methods, which keep the session state right.
        """
        if payload[:1] in (b"c", b"s", b"C", b"S", b"D", b"k", b"R") or payload.startswith(
            b"vCont;"
        ):
            raise ValueError(f"use the GdbStub method for {_printable(payload)!r}")
        return raise_for_error(self._request(payload, self._deadline(timeout)), payload)

    def _command_ok(self, payload: bytes, deadline: float, context: str | None = None) -> None:
        reply = raise_for_error(self._request(payload, deadline), payload, context)
        if reply == b"OK":
            return
        if not reply:
            raise GdbUnsupported(payload)
        raise GdbProtocolError(f"expected OK to {payload[:40]!r}, got {reply[:40]!r}")

    # ------------------------------------------------------------------ registers

    def read_registers(self, timeout: float | None = None) -> X86Registers:
        """All registers of the selected vCPU (one ``g`` round trip)."""
        reply = self._request(b"g", self._deadline(timeout))
        if not reply:
            raise GdbUnsupported(b"g")
        regs = parse_g_reply(raise_for_error(reply, b"g"))
        if self._on_stop_thread():
            self._stop_pc = regs.rip
        return regs

    def _on_stop_thread(self) -> bool:
        if self._g_thread is None:
            return True
        stop = self._stop
        return stop is not None and stop.thread is not None and stop.thread.tid == self._g_thread

    def read_register(self, name: str, timeout: float | None = None) -> int:
        """One register via ``p`` (any name of the ``g`` layout, e.g. ``"cr3"``)."""
        return self._read_register(register_info(name), self._deadline(timeout))

    def _read_register(self, info: RegisterInfo, deadline: float) -> int:
        request = b"p%x" % info.regno
        reply = raise_for_error(self._request(request, deadline), request)
        if not reply:
            raise GdbUnsupported(request)
        data = hex_decode(reply, f"register {info.name}")
        if len(data) != info.size:
            raise GdbProtocolError(
                f"register {info.name} is {len(data)} bytes, expected {info.size}"
            )
        value = int.from_bytes(data, "little")
        if info.name == "rip" and self._on_stop_thread():
            self._stop_pc = value
        return value

    def write_register(self, name: str, value: int | bytes, timeout: float | None = None) -> None:
        """Write one register (``P``; falls back to ``g``/``G`` when ``P`` is missing).

        QEMU quirks: outside 64-bit mode GPR/rip writes are truncated to 32 bits and
        r8..r15 writes are ignored; writing a segment selector loads its descriptor
        (from the GDT when CR0.PE is set); values written to fs_base..efer outside 64-bit
        mode take 4 bytes and are sign-extended.
        """
        info = register_info(name)
        self._write_regs([(info, encode_register(info, value))], self._deadline(timeout))

    def write_registers(
        self, regs: X86Registers, *, use_g: bool = False, timeout: float | None = None
    ) -> None:
        """Make the selected vCPU's registers equal to ``regs``.

        By default one ``P`` per register that differs from ``regs.origin`` (the block it
        was read as; without one, the current registers are read first), in register
        number order: usually one or two small packets, and correct in every vCPU mode.
        ``use_g=True`` sends one ``G`` with all 608 bytes instead: QEMU 7.2 only parses
        that correctly in 64-bit mode, so it is refused when EFER.LMA is clear (a
        compat-mode vCPU cannot be detected from here: do not use it there).
        """
        deadline = self._deadline(timeout)
        if use_g:
            self._stop_pc = None
            self._write_g(regs, deadline)
            return
        base = regs.origin
        if base is None:
            base = self.read_registers(timeout=max(0.001, deadline - time.monotonic())).to_bytes()
        data = regs.to_bytes()
        changes = [(r, data[r.offset : r.offset + r.size]) for r in regs.changed_registers(base)]
        if changes:
            self._write_regs(changes, deadline)

    def _write_g(self, regs: X86Registers, deadline: float) -> None:
        if not regs.efer & _EFER_LMA:
            raise GdbStateError(
                "refusing a 'G' register write outside long mode (EFER.LMA=0): QEMU 7.2 "
                "parses fs_base..efer as 4-byte fields there and would corrupt the vCPU"
            )
        self._command_ok(b"G" + regs.to_g_payload(), deadline, "the 'G' register write")

    def _write_regs(self, changes: list[tuple[RegisterInfo, bytes]], deadline: float) -> None:
        self._stop_pc = None
        if self._p_supported is not False:
            for n, (info, data) in enumerate(changes):
                request = b"P%x=%b" % (info.regno, hex_encode(data))
                reply = raise_for_error(
                    self._request(request, deadline), request, f"writing register {info.name}"
                )
                if reply == b"OK":
                    self._p_supported = True
                    continue
                if reply or n > 0:
                    raise GdbProtocolError(f"unexpected answer {reply[:40]!r} to {request!r}")
                self._p_supported = False
                break
            else:
                return
        # No 'P': read-modify-write the whole block with 'G' (64-bit mode only, see above).
        regs = self.read_registers(timeout=max(0.001, deadline - time.monotonic()))
        for info, data in changes:
            regs = regs.with_register(info.name, data)
        self._write_g(regs, deadline)

    # ------------------------------------------------------------------ memory

    def read_memory(self, addr: int, size: int, timeout: float | None = None) -> bytes:
        """``size`` bytes at virtual address ``addr`` as the selected vCPU sees it.

        Chunked to the stub's packet size, never across a 4 KiB page edge, so an
        unmapped page fails with a :class:`GdbErrorReply` naming its address. The
        timeout covers the whole read.
        """
        _check_range(addr, size)
        deadline = self._deadline(timeout)
        out = bytearray()
        for chunk_addr, n in memory_chunks(addr, size, self._read_chunk):
            done = 0
            while done < n:
                a = chunk_addr + done
                request = b"m%x,%x" % (a, n - done)
                reply = raise_for_error(
                    self._request(request, deadline),
                    request,
                    f"reading {n - done} bytes at {a:#x}",
                )
                data = hex_decode(reply, f"memory at {a:#x}")
                if not data or len(data) > n - done:
                    raise GdbProtocolError(
                        f"gdbstub returned {len(data)} bytes for a {n - done}-byte read at {a:#x}"
                    )
                out += data
                done += len(data)
        return bytes(out)

    def write_memory(self, addr: int, data: bytes, timeout: float | None = None) -> None:
        """Write ``data`` at virtual address ``addr`` (``X`` if the stub has it, else ``M``).

        Writes go through QEMU, so TCG notices code changes (unlike writes to guest RAM
        behind its back).
        """
        _check_range(addr, len(data))
        deadline = self._deadline(timeout)
        for chunk_addr, n in memory_chunks(addr, len(data), self._write_chunk):
            off = chunk_addr - addr
            piece = data[off : off + n]
            context = f"writing {n} bytes at {chunk_addr:#x}"
            if self._x_supported is not False:
                request = b"X%x,%x:%b" % (chunk_addr, n, piece)
                reply = raise_for_error(self._request(request, deadline), request[:24], context)
                if reply == b"OK":
                    self._x_supported = True
                    continue
                if reply:
                    raise GdbProtocolError(f"unexpected answer {reply[:40]!r} to an X write")
                self._x_supported = False
            request = b"M%x,%x:%b" % (chunk_addr, n, hex_encode(piece))
            self._command_ok(request, deadline, context)

    # ------------------------------------------------------------------ breakpoints

    def insert_breakpoint(self, addr: int, kind: int = 1, timeout: float | None = None) -> None:
        """Software breakpoint (``Z0``) at a virtual address; ``kind`` is its length (1 on
        x86). QEMU/TCG implements it without touching guest memory."""
        self._z(b"Z0", addr, kind, timeout)

    def remove_breakpoint(self, addr: int, kind: int = 1, timeout: float | None = None) -> None:
        self._z(b"z0", addr, kind, timeout)

    def insert_hw_breakpoint(self, addr: int, kind: int = 1, timeout: float | None = None) -> None:
        """Hardware breakpoint (``Z1``); under TCG the same mechanism as ``Z0``."""
        self._z(b"Z1", addr, kind, timeout)

    def remove_hw_breakpoint(self, addr: int, kind: int = 1, timeout: float | None = None) -> None:
        self._z(b"z1", addr, kind, timeout)

    def insert_watchpoint(
        self,
        addr: int,
        length: int,
        access: WatchAccess = "write",
        timeout: float | None = None,
    ) -> None:
        """Watchpoint on ``[addr, addr+length)``: ``Z2`` write, ``Z3`` read, ``Z4`` access.

        A hit stops the VM *after* the accessing instruction with a stop reply whose
        ``watch_kind`` is ``watch``/``rwatch``/``awatch`` and ``watch_addr`` the
        watched address.
        """
        self._z(b"Z%d" % _WATCH_TYPE[access], addr, length, timeout)

    def remove_watchpoint(
        self,
        addr: int,
        length: int,
        access: WatchAccess = "write",
        timeout: float | None = None,
    ) -> None:
        self._z(b"z%d" % _WATCH_TYPE[access], addr, length, timeout)

    def _z(self, op: bytes, addr: int, kind: int, timeout: float | None) -> None:
        _check_range(addr, 0)
        if kind < 1:
            raise ValueError("breakpoint kind / watch length must be positive")
        insert = op[:1] == b"Z"
        self._command_ok(
            b"%b,%x,%x" % (op, addr, kind),
            self._deadline(timeout),
            f"{'inserting' if insert else 'removing'} {op.decode()} at {addr:#x} (length {kind})",
        )
        if op[1:] in (b"0", b"1"):  # QEMU counts repeated inserts: so do we
            count = self._breakpoints.get(addr, 0) + (1 if insert else -1)
            if count > 0:
                self._breakpoints[addr] = count
            else:
                self._breakpoints.pop(addr, None)

    # ------------------------------------------------------------------ execution

    def cont(self, timeout: float | None = None) -> None:
        """Resume all vCPUs; returns at once. Collect the stop with :meth:`wait_stop`.

        QEMU 7.2 reports a breakpoint again at once, without executing anything, when
        told to continue from its address (``s`` does step over it). So when the vCPU
        that stopped last sits on one of our breakpoints (its rip, as read since the
        stop or with one ``p``; only asked while breakpoints are set), it is first
        stepped off it with ``vCont;s`` (as GDB does). Likewise after a watchpoint stop
        QEMU owes an empty debug stop, which a step absorbs first. Should such a step
        stop for a real reason (a watchpoint), that stop is what the next
        :meth:`wait_stop` returns. If it times out, the step is still pending: use
        :meth:`interrupt` / :meth:`wait_stop`.
        """
        if self._running:
            raise GdbStateError("the VM is already running")
        deadline = self._deadline(timeout)
        pending = None
        if self._watch_hangover:
            flushed = self._internal_step(deadline)
            if not _plain_trap(flushed):
                pending = flushed
        if pending is None:
            pending = self._step_off_breakpoint(deadline)
        if pending is not None:
            self._pending_stop = pending
            self._running = True
            return
        self._send(b"c", deadline)
        self._running = True

    def cont_all(self, timeout: float | None = None) -> None:
        """Resume every vCPU with ``vCont;c`` after a stop that was no breakpoint (an
        :meth:`interrupt`). Why not ``c``: with QEMU's TCG and two vCPUs, a plain ``c``
        after an interrupt was seen to leave the second vCPU stopped (the guest's serial
        interrupts then went unserved); ``vCont;c`` resumes them all."""
        if self._running:
            raise GdbStateError("the VM is already running")
        self._send(b"vCont;c", self._deadline(timeout))
        self._running = True

    def _step_off_breakpoint(self, deadline: float) -> StopReply | None:
        stop = self._stop
        if not self._breakpoints or stop is None or not stop.stopped or stop.watch_kind:
            return None
        tid = stop.thread.tid if stop.thread is not None and stop.thread.tid > 0 else None
        pc = self._stop_pc
        if pc is None:
            if tid is not None and self._g_thread not in (None, tid):
                self._command_ok(b"Hg" + ThreadId(tid).encode(), deadline, "reselecting")
                self._g_thread = tid
            pc = self._read_register(register_info("rip"), deadline)
        if pc not in self._breakpoints:
            return None
        stepped = self._internal_step(deadline)
        return None if _plain_trap(stepped) else stepped

    def _internal_step(self, deadline: float) -> StopReply:
        """Step the vCPU that reported the last stop (``vCont;s:tid``, else ``s``)."""
        stop = self._stop
        tid = stop.thread.tid if stop and stop.thread and stop.thread.tid > 0 else None
        if self._vcont_step is None:
            self._vcont_step = b";s" in self._request(b"vCont?", deadline)
        request = b"vCont;s:" + ThreadId(tid).encode() if tid and self._vcont_step else b"s"
        self._send(request, deadline)
        self._running = True
        return self._wait_stop(deadline)

    def step_thread(self, tid: int, timeout: float | None = None) -> StopReply:
        """Single-step vCPU ``tid`` alone (``vCont;s:tid``) and wait for its stop.

        Why not ``s``: QEMU resumes every vCPU for a plain step (``vm_start``); with
        ``vCont`` the vCPUs without an action stay stopped, so a one-instruction probe
        on one vCPU never lets the others run. On :class:`GdbTimeout` the step is still
        pending (a halted vCPU): :meth:`interrupt` and :meth:`wait_stop` end it.
        """
        deadline = self._deadline(timeout)
        if self._running:
            raise GdbStateError("the VM is already running")
        if self._vcont_step is None:
            self._vcont_step = b";s" in self._request(b"vCont?", deadline)
        if not self._vcont_step:
            raise GdbUnsupported(b"vCont;s", "this stub cannot step one vCPU alone")
        self._send(b"vCont;s:" + ThreadId(tid).encode(), deadline)
        self._running = True
        return self._wait_stop(deadline)

    def step(self, timeout: float | None = None) -> StopReply:
        """Single-step the selected vCPU (``s``) and wait for its stop reply.

        Stepping from a breakpoint works as is. After a watchpoint stop, QEMU 7.2's next
        step executes nothing (same rip, plain ``T05``): that empty step is detected
        (rip read before and after) and followed by the real one.

        On :class:`GdbTimeout` the step is still pending (the vCPU may sit in ``hlt``):
        :meth:`interrupt` and :meth:`wait_stop` end it.
        """
        deadline = self._deadline(timeout)
        if self._running:
            raise GdbStateError("the VM is already running")
        if self._watch_hangover:
            rip = register_info("rip")
            before = self._read_register(rip, deadline)
            self._send(b"s", deadline)
            self._running = True
            first = self._wait_stop(deadline)
            if not _plain_trap(first) or self._read_register(rip, deadline) != before:
                return first
        self._send(b"s", deadline)
        self._running = True
        return self._wait_stop(deadline)

    def interrupt(self, timeout: float | None = None) -> None:
        """Ask the running VM to stop (sends 0x03); the stop reply (signal 2) comes through
        :meth:`wait_stop`. Does nothing when not running. Safe from another thread."""
        if self._running and self._pending_stop is None:
            self._send_raw(b"\x03", self._deadline(timeout))

    def wait_stop(self, timeout: float) -> StopReply:
        """Wait for the stop reply of the last :meth:`cont`; :class:`GdbTimeout` if the VM
        is still running at the deadline (it keeps running; call again or interrupt).

        Afterwards register and memory access go to the vCPU named in the reply
        (``stop.thread``), as QEMU reselects it.
        """
        if not self._running:
            raise GdbStateError("the VM is not running: nothing to wait for")
        return self._wait_stop(self._deadline(timeout))

    def _wait_stop(self, deadline: float) -> StopReply:
        stop = self._pending_stop
        while stop is None:
            payload = self._read_packet(deadline)
            if payload[:1] == b"O" and payload != b"OK":
                continue  # console output while running
            stop = parse_stop_reply(payload)
        self._pending_stop = None
        self._running = False
        self._stop = stop
        self._watch_hangover = stop.watch_kind is not None
        # QEMU points register access (Hg) and stepping (Hc) at the reporting vCPU.
        self._g_thread = None
        self._stop_pc = None
        return stop

    # ------------------------------------------------------------------ threads / vCPUs

    def threads(self, timeout: float | None = None) -> list[int]:
        """Thread ids (QEMU: one per vCPU, vCPU index + 1), via ``qfThreadInfo``/``qs``."""
        deadline = self._deadline(timeout)
        out: list[int] = []
        request = b"qfThreadInfo"
        for _ in range(_MAX_THREAD_PAGES):
            reply = raise_for_error(self._request(request, deadline), request)
            if not reply:
                raise GdbUnsupported(request)
            page, last = parse_thread_list(reply)
            out.extend(t.tid for t in page)
            self._note_pid(page)
            if last:
                return out
            request = b"qsThreadInfo"
        raise GdbProtocolError(f"gdbstub thread list did not end after {_MAX_THREAD_PAGES} pages")

    def select_thread(self, tid: int, timeout: float | None = None) -> None:
        """Select the vCPU for register/memory access (``Hg``) and stepping (``Hc``)."""
        deadline = self._deadline(timeout)
        t = ThreadId(tid).encode()
        self._command_ok(b"Hg" + t, deadline, f"selecting thread {tid}")
        self._g_thread = tid
        self._command_ok(b"Hc" + t, deadline, f"selecting thread {tid} for stepping")

    def current_thread(self, timeout: float | None = None) -> int:
        """``qC``: the stub's current thread."""
        reply = self.request(b"qC", timeout)
        if not reply.startswith(b"QC"):
            raise GdbProtocolError(f"bad qC reply {reply[:40]!r}")
        thread = parse_thread_id(reply[2:])
        self._note_pid([thread])
        return thread.tid

    def _note_pid(self, threads: list[ThreadId]) -> None:
        for t in threads:
            if t.pid not in (None, -1):
                self._mp_pid = t.pid

    # ------------------------------------------------------------------ misc

    @property
    def multiprocess_pid(self) -> int | None:
        """The process id QEMU names in its replies once it is in multiprocess mode.

        QEMU 7.2 keeps multiprocess mode for the rest of its life once any client asked
        for it (gdb does): stop replies then read ``T05thread:p1.01;`` and a plain ``D``
        is refused with ``E22``, leaving the VM paused. None while replies are plain.
        """
        stop = self._stop or self._initial_stop
        if stop is not None and stop.thread is not None and stop.thread.pid not in (None, -1):
            return stop.thread.pid
        return self._mp_pid

    def detach(self, timeout: float | None = None) -> None:
        """``D``: QEMU removes our breakpoints and resumes the VM; the socket is closed.

        In multiprocess mode (see :attr:`multiprocess_pid`) this is ``D;PID``. A stub
        that refuses a plain ``D`` with ``E22`` (multiprocess mode we could not see
        from its replies) is asked again as ``D;1``, QEMU's only process.
        """
        try:
            if self._running:
                raise GdbStateError("interrupt and wait_stop before detaching")
            deadline = self._deadline(timeout)
            pid = self.multiprocess_pid
            request = b"D" if pid is None else b"D;%x" % pid
            reply = self._request(request, deadline)
            if reply == b"E22" and pid is None:
                request = b"D;1"
                reply = self._request(request, deadline)
            if reply != b"OK":
                raise_for_error(reply, request, "detaching")
                raise GdbProtocolError(f"expected OK to {request!r}, got {reply[:40]!r}")
            self._flush_acks(deadline)
        finally:
            if not self._running:
                self.close()

    def await_external_resume(self, timeout: float | None = None) -> None:
        """Leave the stopped VM to someone else to resume (QMP ``cont``) and expect the
        next stop reply unasked.

        Why: a ``pause`` action keeps the VM stopped at the hit that caused it; the
        operator resumes it through QMP (``vmshield resume``), which QEMU does without
        telling the gdb client, and QEMU then reports the next breakpoint hit as an
        ordinary stop reply. Owed acks are sent now, while a byte cannot be mistaken
        for an interrupt. Afterwards :attr:`running` is True (collect the stop with
        :meth:`wait_stop`); if the VM is still stopped when the session must end, use
        :meth:`assume_stopped` (an interrupt cannot stop a VM that is not running, and
        QEMU sends no reply to it).
        """
        if self._running:
            raise GdbStateError("the VM is already running")
        self._flush_acks(self._deadline(timeout))
        self._pending_stop = None
        self._running = True

    def assume_stopped(self) -> None:
        """The VM is known (from QMP) to be stopped with no stop reply on the way: take
        the session back to the stopped state without waiting for one."""
        self._pending_stop = None
        self._running = False
        self._g_thread = None
        self._stop_pc = None

    def query_monitor(self, command: str, timeout: float | None = None) -> str:
        """Run a QEMU monitor (HMP) command through ``qRcmd`` and return its output."""
        deadline = self._deadline(timeout)
        request = b"qRcmd," + hex_encode(command.encode())
        reply = self._request(request, deadline)
        self._stop_pc = None  # a monitor command may change anything
        output = bytearray()
        while True:
            raise_for_error(reply, request[:40], f"monitor command {command!r}")
            if reply == b"OK":
                return output.decode("utf-8", "replace")
            if not reply:
                raise GdbUnsupported(request[:40], "no monitor commands")
            if reply[:1] != b"O":
                raise GdbProtocolError(f"unexpected qRcmd reply {reply[:40]!r}")
            output += hex_decode(reply[1:], "qRcmd output")
            if len(output) > _MAX_XFER:
                raise GdbProtocolError(f"monitor output exceeds {_MAX_XFER} bytes")
            reply = self._read_packet(deadline)

    def read_feature_xml(self, annex: str = "target.xml", timeout: float | None = None) -> bytes:
        """A target description document (``qXfer:features:read``), e.g. ``i386-64bit.xml``."""
        return self._read_xfer(b"features", annex.encode(), self._deadline(timeout))

    def _read_xfer(self, obj: bytes, annex: bytes, deadline: float) -> bytes:
        out = bytearray()
        length = max(16, (self._read_chunk * 2) - 16)
        while True:
            request = b"qXfer:%b:read:%b:%x,%x" % (obj, annex, len(out), length)
            reply = raise_for_error(self._request(request, deadline), request)
            if not reply:
                raise GdbUnsupported(request)
            kind, data = reply[:1], reply[1:]
            if kind not in (b"m", b"l"):
                raise GdbProtocolError(f"bad qXfer reply {reply[:40]!r}")
            out += data
            if len(out) > _MAX_XFER:
                raise GdbProtocolError(f"qXfer object {annex!r} exceeds {_MAX_XFER} bytes")
            if kind == b"l":
                return bytes(out)
            if not data:
                raise GdbProtocolError(f"qXfer of {annex!r} returned no data and no end")

    def halt_reason(self, timeout: float | None = None) -> StopReply:
        """``?``: why the target is stopped (QEMU answers ``T05`` after any stop)."""
        return parse_stop_reply(self.request(b"?", timeout))


def _plain_trap(stop: StopReply) -> bool:
    return stop.stopped and stop.signal == SIGTRAP and stop.watch_kind is None


def _check_range(addr: int, size: int) -> None:
    if addr < 0 or size < 0 or addr + size > 1 << 64:
        raise ValueError(f"address range {addr:#x}+{size:#x} is outside the 64-bit space")
