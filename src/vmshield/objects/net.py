"""Network objects: a socket connects, is bound, listens (LSM hooks: ``deny`` allowed)."""

from __future__ import annotations

from typing import Any

from vmshield.errors import VmshieldError
from vmshield.guest.kernel import Kernel
from vmshield.guest.sockets import decode_sockaddr, family_name
from vmshield.objects.context import PointContext
from vmshield.objects.model import ALL_ACTIONS, COMMON_FILTERS, CatalogObject
from vmshield.space import layout as L
from vmshield.space.captures import PORT_HOST_U16, Captured, Plan, fetch

FILTERS = (*COMMON_FILTERS, "address", "port")
ADDR_FIELDS = ("family", "address", "port")

# -- net.connect, net.bind ------------------------------------------------------------


def _sock_addr(c: PointContext) -> dict[str, Any]:
    """security_socket_connect/bind(struct socket *, struct sockaddr *, int addrlen)."""
    return c.sockaddr(c.arg(1), c.arg(2) & 0xFFFF)


def _sock_addr_plan(k: Kernel) -> Plan:
    return Plan((fetch(L.F_KMEM, 1, (0,), 28),), _sock_addr_captured, port_item=0, nargs=3,
                agg_key=L.K_NET)  # fmt: skip


def _sock_addr_captured(c: Captured) -> dict[str, Any]:
    raw = c.item(0, "sockaddr").data[: max(2, min(c.arg(2) & 0xFFFF, 28))]
    return decode_sockaddr(raw)


# -- net.listen -----------------------------------------------------------------------


def _listen(c: PointContext) -> dict[str, Any]:
    """security_socket_listen(struct socket *sock, int backlog): local address."""
    k = c.kernel
    sk = c.u64(c.arg(0) + c.off("socket", "sk"))
    fam = k.read(sk + c.off("sock", "__sk_common.skc_family"), 2)
    port = int.from_bytes(k.read(sk + c.off("sock", "__sk_common.skc_num"), 2), "little")
    addr = k.read(sk + c.off("sock", "__sk_common.skc_rcv_saddr"), 4)
    family = int.from_bytes(fam, "little")
    return {
        "family": family_name(family),
        "address": ".".join(str(b) for b in addr),
        "port": port,
        "backlog": c.sarg(1),
    }


def _listen_plan(k: Kernel) -> Plan:
    off = k.member_offset
    sk = off("socket", "sk")
    return Plan(
        (fetch(L.F_KMEM, 0, (sk, off("sock", "__sk_common.skc_num")), 2),
         fetch(L.F_KMEM, 0, (sk, off("sock", "__sk_common.skc_family")), 2),
         fetch(L.F_KMEM, 0, (sk, off("sock", "__sk_common.skc_rcv_saddr")), 4)),
        _listen_captured, port_item=0, port_mode=PORT_HOST_U16, nargs=2, agg_key=L.K_NET,
    )  # fmt: skip


def _listen_captured(c: Captured) -> dict[str, Any]:
    addr = c.item(2, "address").data[:4]
    if len(addr) != 4:
        raise VmshieldError("address: short capture")
    return {
        "family": family_name(c.item(1, "family").u(0, 2)),
        "address": ".".join(str(b) for b in addr),
        "port": c.item(0, "port").u(0, 2),
        "backlog": c.sarg(1),
    }


OBJECTS = (
    CatalogObject("net.connect", "a socket connects", ("security_socket_connect",),
                  ADDR_FIELDS, FILTERS, ALL_ACTIONS, _sock_addr, plan=_sock_addr_plan),
    CatalogObject("net.bind", "a socket is bound", ("security_socket_bind",), ADDR_FIELDS,
                  FILTERS, ALL_ACTIONS, _sock_addr, plan=_sock_addr_plan),
    CatalogObject("net.listen", "a socket listens", ("security_socket_listen",),
                  (*ADDR_FIELDS, "backlog"), FILTERS, ALL_ACTIONS, _listen,
                  plan=_listen_plan),
)  # fmt: skip
