"""Each isolation object is defined once, in its family module (vmshield.objects).

Why: the exit engine's decoder and the security space's capture plan used to live in
two packages and drift apart; now a family module holds both, and these checks make
sure every family is gathered into the catalog and every monitorable object can be
served by both engines.
"""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import vmshield.objects
from vmshield.errors import VmshieldError
from vmshield.monitor.request import PROCESS_OBJECTS
from vmshield.objects.catalog import CATALOG, INTEGRITY, plan_for
from vmshield.objects.kfunc import kfunc_object


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
    assert plan.nargs == 6 and not plan.fetches
