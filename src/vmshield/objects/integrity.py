"""Sensitive modules: objects checked from the host against a reference (see
:mod:`vmshield.monitor.integrity`), on either engine; no monitoring point, so no live
decoder and no capture plan."""

from __future__ import annotations

from typing import Any

from vmshield.errors import VmshieldError
from vmshield.objects.context import PointContext
from vmshield.objects.model import INTEGRITY_ACTIONS, REPORT_ACTIONS, CatalogObject


def _host_check(c: PointContext) -> dict[str, Any] | None:
    raise VmshieldError("integrity objects are checked from the host, not at a point")


OBJECTS = (
    CatalogObject("kernel.text", "kernel code changed (core image, or module=NAME)",
                  (), ("what", "where", "address", "old", "new", "response", "count"),
                  ("module",), INTEGRITY_ACTIONS, _host_check),
    CatalogObject("kernel.rodata", "read-only kernel data changed (core image)", (),
                  ("what", "where", "address", "old", "new", "response", "count"), (),
                  INTEGRITY_ACTIONS, _host_check),
    CatalogObject("kernel.syscall_table", "a system call table entry changed (64-bit, "
                  "compat)", (), ("where", "index", "old", "new", "old_symbol",
                                  "new_symbol", "response", "count"), (),
                  INTEGRITY_ACTIONS, _host_check),
    CatalogObject("kernel.idt", "an interrupt gate or a vCPU's IDTR changed", (),
                  ("where", "index", "old", "new", "old_symbol", "new_symbol", "cpu",
                   "response", "count"), (), INTEGRITY_ACTIONS, _host_check),
    CatalogObject("cpu.control", "CR0.WP, CR4.SMEP/SMAP/UMIP or EFER.NXE cleared on a "
                  "vCPU", (), ("where", "register", "bit", "cpu", "old", "new",
                               "response", "count"), (), INTEGRITY_ACTIONS, _host_check),
    CatalogObject("cpu.msr", "LSTAR, CSTAR, STAR or SYSENTER_* changed on a vCPU",
                  (), ("where", "register", "cpu", "old", "new", "old_symbol",
                       "new_symbol", "response", "count"), (),
                  INTEGRITY_ACTIONS, _host_check),
    CatalogObject("kernel.modules", "a module hidden from the module list (cross-view "
                  "with sysfs and the module tree), or executable memory in the module "
                  "area that nothing owns", (), ("what", "where", "module", "address",
                                                 "evidence", "pages"), ("exec",),
                  REPORT_ACTIONS, _host_check),
    CatalogObject("space.self", "the security space itself was tampered with", (),
                  ("what", "where", "address", "expected", "found", "response"), (),
                  ("log",), _host_check),
)  # fmt: skip
