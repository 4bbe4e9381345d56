"""Each isolation object is defined once, in its family module (vmshield.objects).

Why: the exit engine's decoder and the security space's capture plan used to live in
two packages and drift apart; now a family module holds both, and these checks make
sure every family is gathered into the catalog and every monitorable object can be
served by both engines.
"""

from __future__ import annotations

import importlib
import pkgutil
from types import SimpleNamespace
from typing import Any

import pytest

import vmshield.objects
from vmshield.errors import VmshieldError
from vmshield.monitor.request import PROCESS_OBJECTS
from vmshield.objects.catalog import CATALOG, INTEGRITY, plan_for
from vmshield.objects.kfunc import kfunc_object
from vmshield.space import layout as L


def _families() -> dict[str, tuple[object, ...]]:
    out = {}
    for info in pkgutil.iter_modules(vmshield.objects.__path__):
        mod = importlib.import_module(f"vmshield.objects.{info.name}")
        if hasattr(mod, "OBJECTS"):
            out[info.name] = mod.OBJECTS
    return out


def test_every_family_is_in_the_catalog() -> None:
    fams = _families()
    assert set(fams) >= {"process", "file", "net", "cred", "module", "ptrace", "bpf"}
    gathered = list(CATALOG.values()) + list(INTEGRITY.values())
    for name, objs in fams.items():
        for o in objs:
            assert o in gathered, f"{name}: {o} is not gathered by objects/catalog.py"


def test_every_catalog_object_has_both_engines() -> None:
    for o in CATALOG.values():
        assert o.candidates and o.plan is not None, o.name
    for o in INTEGRITY.values():
        assert o.plan is None and not o.candidates, o.name
        with pytest.raises(VmshieldError):
            plan_for(o.name, None)  # type: ignore[arg-type]


def test_process_objects_cover_the_catalog() -> None:
    assert sorted(PROCESS_OBJECTS) == sorted(CATALOG)
    assert PROCESS_OBJECTS[-1] == "module.load"  # optional: skipped where missing


def test_kfunc_plan_reads_arguments_only() -> None:
    o = kfunc_object("security_file_open")
    assert "deny" in o.actions
    plan = plan_for(o.name, None)  # type: ignore[arg-type]  # no struct offsets read
    assert plan.nargs == 6 and not plan.fetches and plan.raw_args


# Every struct member 8 bytes on; cred's fields spread so their span starts at 4.
_CRED = {"uid": 4, "euid": 12, "gid": 8, "egid": 16, "fsuid": 28, "cap_effective": 40}
_KERNEL: Any = SimpleNamespace(member_offset=lambda s, f: _CRED[f] if s == "cred" else 8)


def test_plans_carry_what_the_agent_needs_per_object() -> None:
    """What the space engine used to keep in tables of object names (issue 10 item 2:
    an object is defined in one file) is now read from each object's plan."""
    keys = {n: plan_for(n, _KERNEL).agg_key for n in CATALOG}
    assert {n for n, k in keys.items() if k == L.K_PATH} == {
        "process.exec", "file.open", "file.unlink", "file.rename"}  # fmt: skip
    assert {n for n, k in keys.items() if k == L.K_NET} == {"net.connect", "net.bind", "net.listen"}
    assert keys["cred.change"] == L.K_EUID and keys["module.load"] == L.K_NAME
    optional = {n: plan_for(n, _KERNEL).optional_items for n in CATALOG}
    assert {n for n, m in optional.items() if m} == {"process.exec"}
    assert optional["process.exec"] == 2  # argv: reported as faulted, the event goes on
    cred = plan_for("cred.change", _KERNEL)
    assert cred.cred_offsets == (0, 8, 4, 12, 24, 36)
    assert all(not plan_for(n, _KERNEL).cred_offsets for n in CATALOG if n != "cred.change")
