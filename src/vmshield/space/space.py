"""The security space in one guest: build, patch sites, drain, check, tear down.

Build (one parked task, see :mod:`vmshield.space.borrow`): the guest kernel's module
allocator gives one region ``[agent text][config][per-CPU rings]``; the relocated agent
is written into it through the gdbstub (QEMU invalidates translated code on such
writes), the text is made read-only + executable and the config read-only with the
kernel's own ``set_memory_*`` (which also fixes the direct-map alias and flushes every
CPU's TLB). Patching turns each point's ftrace NOP into ``call vms_gate`` with every
vCPU stopped, after marking the function's ftrace record DISABLED so that the guest's
ftrace never tries to rewrite our call (it would find unexpected bytes and shut ftrace
down). Draining and integrity checks read guest RAM directly: no VM exit.

Each job has its module (see :mod:`vmshield.space.base`): ``region`` (build, adopt,
destroy), ``sites`` (patching, ftrace flags), ``draining`` (rings), ``integrity``
(check, repair), ``frames`` (protected pages, kernel tables), ``state`` (the state
file). :class:`SecuritySpace` is all of them, the one name callers use.
"""

from __future__ import annotations

from vmshield.space.region import RegionLifecycle


class SecuritySpace(RegionLifecycle):
    """The agent region and its sites in one guest (see the module docstring)."""
