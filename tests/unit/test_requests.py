"""Isolation request parsing and catalog validation: clear errors, nothing else."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmshield.errors import VmshieldError
from vmshield.monitor.request import (
    IsolationRequest,
    RequestError,
    catalog_object,
    check_filter,
    parse_filters,
    parse_object_spec,
    parse_ufunc,
    validate,
)
from vmshield.objects.catalog import CATALOG
from vmshield.objects.filters import match_filter


def test_object_spec_with_filters_and_action() -> None:
    assert parse_object_spec("file.open,path=/etc/secret*,action=deny") == (
        "file.open",
        {"path": "/etc/secret*"},
        "deny",
    )
    assert parse_object_spec("net.connect") == ("net.connect", {}, None)


@pytest.mark.parametrize("bad", ["path", "=x", "path=", "a=b,c"])
def test_bad_filters_name_the_problem(bad: str) -> None:
    with pytest.raises(RequestError, match="bad filter"):
        parse_filters(bad.split(","))


def test_catalog_lookups() -> None:
    assert catalog_object("file.open") is CATALOG["file.open"]
    assert catalog_object("kfunc:do_sys_openat2").candidates == ("do_sys_openat2",)
    assert "deny" in catalog_object("kfunc:security_file_open").actions
    assert "deny" not in catalog_object("kfunc:do_sys_openat2").actions
    with pytest.raises(RequestError, match=r"unknown isolation object 'file\.nope'"):
        catalog_object("file.nope")
    with pytest.raises(RequestError, match="bad kernel function"):
        catalog_object("kfunc:a;b")
    with pytest.raises(RequestError, match="bad process"):
        catalog_object("process:")


def test_ufunc_forms() -> None:
    assert parse_ufunc("ufunc:/bin/x:0x10") == ("/bin/x", 0x10, None)
    assert parse_ufunc("ufunc:/bin/x:123") == ("/bin/x", 123, None)
    assert parse_ufunc("ufunc:/bin/x:main") == ("/bin/x", None, "main")
    for bad in ("ufunc:bin/x:1", "ufunc:/bin/x:", "ufunc:/bin/x:0xzz", "ufunc:/bin/x:a-b"):
        with pytest.raises(RequestError):
            parse_ufunc(bad)


def test_filters_match_process_and_fields() -> None:
    proc = {"pid": 7, "comm": "sshd", "uid": 0}
    assert match_filter("pid", "7", {}, proc)
    assert match_filter("comm", "ssh*", {}, proc)
    assert match_filter("path", "/etc/*", {"path": "/etc/shadow"}, proc)
    assert match_filter("port", "22", {"port": 22}, proc)
    assert not match_filter("uid", "1000", {}, proc)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80))
def test_random_specs_parse_or_fail_cleanly(spec: str) -> None:
    try:
        name, flt, _action = parse_object_spec(spec)
        catalog_object(name)
    except VmshieldError:
        return
    assert all(k and v for k, v in flt.items())


@pytest.mark.parametrize(
    ("key", "value", "normal"),
    [
        ("pid", "7", "7"),
        ("pid", "007", "7"),
        ("uid", "4294967295", "4294967295"),
        ("port", "22", "22"),
        ("port", "80*", "80*"),
        ("changed", "TRUE", "True"),
        ("escalation", "false", "False"),
        ("changed", "*", "*"),
        ("comm", "sshd", "sshd"),
        ("comm", "a-very-long-program*", "a-very-long-program*"),
        ("path", "/etc/*", "/etc/*"),
        ("address", "10.0.0.*", "10.0.0.*"),
        ("address", "fe80::1", "fe80::1"),
    ],
)
def test_filter_values_are_typed_and_normalised(key: str, value: str, normal: str) -> None:
    assert check_filter(key, value) == normal


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("uid", "root"),
        ("pid", "abc"),
        ("pid", "-1"),
        ("pid", "2147483648"),
        ("uid", "4294967296"),
        ("pid", "١٢"),  # non-ASCII digits: never a pid
        ("port", "http"),
        ("port", "65536"),
        ("port", "8*x"),
        ("changed", "yes"),
        ("escalation", ""),
        ("comm", "a-name-of-16-byt"),
        ("address", "example.com"),
        ("path", "/tmp/\x1b[2J"),
    ],
)
def test_filter_values_of_the_wrong_type_are_refused(key: str, value: str) -> None:
    with pytest.raises(RequestError, match=f"filter {key}="):
        check_filter(key, value)


def test_validate_needs_no_vm() -> None:
    req = IsolationRequest(vm="v", object="net.connect", filters={"port": "0443"})
    assert validate(req) is CATALOG["net.connect"]
    assert req.filters == {"port": "443"}
    with pytest.raises(RequestError, match="uid takes a decimal number"):
        validate(IsolationRequest(vm="v", object="file.open", filters={"uid": "root"}))
    with pytest.raises(RequestError, match="cannot take action 'deny'"):
        validate(IsolationRequest(vm="v", object="process.exit", action="deny"))
    # process:X takes any action (each behaviour logs what it cannot take)
    validate(IsolationRequest(vm="v", object="process:sshd", action="deny"))
