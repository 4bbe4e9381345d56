"""``struct sockaddr`` as the kernel lays it out: family, address and port.

Pure (bytes in, values out): the exit engine decodes a kernel copy read through guest
memory, the security space decodes the bytes its agent copied into a record; both must
say the same thing about the same connect.
"""

from __future__ import annotations

import ipaddress
import struct

AF_INET, AF_INET6, AF_UNIX = 2, 10, 1


def decode_sockaddr(raw: bytes) -> dict[str, object]:
    """Family, address and port from the bytes of a ``struct sockaddr`` (both engines)."""
    family = int.from_bytes(raw[:2], "little")
    out: dict[str, object] = {"family": family_name(family)}
    if family == AF_INET and len(raw) >= 8:
        out["port"] = struct.unpack(">H", raw[2:4])[0]
        out["address"] = ".".join(str(b) for b in raw[4:8])
    elif family == AF_INET6 and len(raw) >= 24:
        out["port"] = struct.unpack(">H", raw[2:4])[0]
        out["address"] = str(ipaddress.IPv6Address(raw[8:24]))
    elif family == AF_UNIX:
        out["address"] = raw[2:].split(b"\0", 1)[0].decode(errors="backslashreplace")
    return out


def family_name(f: int) -> str:
    return {AF_INET: "inet", AF_INET6: "inet6", AF_UNIX: "unix"}.get(f, str(f))
