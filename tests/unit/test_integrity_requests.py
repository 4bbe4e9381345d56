"""Integrity objects as isolation requests: listed by the catalog, validated like the
others, ``restore`` only where something can be put back, and nothing else changed."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from vmshield.cli.main import app
from vmshield.monitor.kinds import Action
from vmshield.monitor.request import (
    IsolationRequest,
    RequestError,
    is_integrity,
    parse_object_spec,
    validate,
)
from vmshield.objects.catalog import CATALOG, INTEGRITY

ISSUE_13 = ("kernel.text", "kernel.rodata", "kernel.syscall_table", "kernel.idt",
            "cpu.control", "cpu.msr", "kernel.modules", "space.self")  # fmt: skip


def test_every_issue_13_object_is_in_the_catalog_command() -> None:
    res = CliRunner().invoke(app, ["catalog", "--json"])
    assert res.exit_code == 0, res.output
    listed = {row["object"]: row for row in json.loads(res.output)}
    for name in ISSUE_13:
        assert name in listed and is_integrity(name)
    assert "restore" in listed["kernel.syscall_table"]["actions"]
    assert "restore" not in listed["kernel.modules"]["actions"]


@pytest.mark.parametrize("name", ["kernel.syscall_table", "kernel.text", "cpu.control"])
def test_restore_is_accepted_from_the_command_line_spec(name: str) -> None:
    obj, flt, action = parse_object_spec(f"{name},action=restore")
    assert action == Action.RESTORE
    validate(IsolationRequest(vm="x", object=obj, filters=flt, action=action))


def test_restore_applies_only_to_integrity_objects() -> None:
    with pytest.raises(RequestError, match="cannot take action 'restore'"):
        validate(IsolationRequest(vm="x", object="file.open", action="restore"))
    for name in ("kernel.modules",):
        with pytest.raises(RequestError, match="cannot take action 'restore'"):
            validate(IsolationRequest(vm="x", object=name, action="restore"))
    with pytest.raises(RequestError, match="cannot take action 'deny'"):
        validate(IsolationRequest(vm="x", object="kernel.idt", action="deny"))


def test_module_text_takes_a_module_filter_and_others_none() -> None:
    validate(IsolationRequest(vm="x", object="kernel.text", filters={"module": "ext4"}))
    with pytest.raises(RequestError, match="has no filter 'pid'"):
        validate(IsolationRequest(vm="x", object="kernel.idt", filters={"pid": "1"}))


def test_behaviour_objects_are_unchanged() -> None:
    assert not set(CATALOG) & set(INTEGRITY)
    assert all("restore" not in o.actions for o in CATALOG.values())
