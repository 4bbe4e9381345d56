"""vmshield: isolate and monitor behaviour inside running QEMU/KVM guests from the hypervisor.

The public API (the CLI, the daemon, the benchmarks and the tests stand on it too):

- :func:`open_vm` attaches to a lab VM, a QEMU QMP socket or a QEMU ELF dump and returns
  a :class:`VM` (kernel model, ``ps()``, ``modules()``, ``symbols()``, ``paused()``);
- :class:`Monitor` arms :class:`IsolationRequest` objects in a VM on the engine of
  :class:`EngineKind` and delivers :class:`Event` objects (``events()``,
  ``subscribe()``), with the tamper switch of :class:`TamperPolicy`;
- :data:`CATALOG` lists the isolation objects; :class:`Action` the actions;
- every error is a :class:`VmshieldError`.

Names are imported on first use, so ``import vmshield`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "open_vm": "vmshield.guest.vm",
    "VM": "vmshield.guest.vm",
    "Symbol": "vmshield.guest.vm",
    "Monitor": "vmshield.monitor.session",
    "Summary": "vmshield.monitor.session",
    "IsolationRequest": "vmshield.monitor.request",
    "RequestError": "vmshield.monitor.request",
    "Event": "vmshield.monitor.events",
    "CATALOG": "vmshield.objects.catalog",
    "Action": "vmshield.monitor.kinds",
    "EngineKind": "vmshield.monitor.kinds",
    "TamperPolicy": "vmshield.monitor.kinds",
    "Engine": "vmshield.monitor.kinds",
    "ChoiceError": "vmshield.monitor.kinds",
    "VmshieldError": "vmshield.errors",
}
__all__ = [
    "CATALOG", "VM", "Action", "ChoiceError", "Engine", "EngineKind", "Event",
    "IsolationRequest", "Monitor", "RequestError", "Summary", "Symbol", "TamperPolicy",
    "VmshieldError", "open_vm",
]  # fmt: skip

if TYPE_CHECKING:
    from vmshield.errors import VmshieldError
    from vmshield.guest.vm import VM, Symbol, open_vm
    from vmshield.monitor.events import Event
    from vmshield.monitor.kinds import Action, ChoiceError, Engine, EngineKind, TamperPolicy
    from vmshield.monitor.request import IsolationRequest, RequestError
    from vmshield.monitor.session import Monitor, Summary
    from vmshield.objects.catalog import CATALOG


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'vmshield' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
