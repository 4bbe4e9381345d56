"""The public API, in process (no subprocess): ``open_vm``, ``Monitor``'s engine choice,
fallback and tamper switch, the event fan-out, and errors that carry their fields.
Real QEMU and real kernels, as everywhere in the integration tests."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

import vmshield
from vmshield import EngineKind, IsolationRequest, Monitor, TamperPolicy, open_vm
from vmshield.guest.vm import VM

from .conftest import Lab, boot

SHADOW = {"path": "/etc/shadow"}


@pytest.fixture(scope="module")
def lab61() -> Iterator[Lab]:
    yield from boot("6.1", "api-6.1")


@pytest.fixture
def vm(lab61: Lab) -> Iterator[VM]:
    with open_vm(lab61.name) as v:
        yield v


def _req(vm: VM, obj: str = "file.open", **kw: object) -> IsolationRequest:
    return IsolationRequest(vm=vm.name, object=obj, filters=dict(SHADOW), **kw)  # type: ignore[arg-type]


def test_open_vm_views(lab61: Lab, vm: VM) -> None:
    assert vm.live and vm.kernel.release == lab61.sh("uname -r").strip()
    names = {t.name for t in vm.ps()}
    assert "init" in names or "sh" in names
    assert [s.name for s in vm.symbols("^_text$")] == ["_text"]
    assert isinstance(vm.modules(), list)
    with vm.paused():
        assert vm.target is not None and not vm.target.qmp.running()
    assert vm.target.qmp.running()


def _collect(mon: Monitor, out: list[vmshield.Event]) -> threading.Thread:
    reader = threading.Thread(target=lambda: out.extend(mon.events()), daemon=True)
    reader.start()
    time.sleep(0.05)
    return reader


def _wait(pred: object, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not pred():  # type: ignore[operator]
        if time.monotonic() > deadline:
            pytest.fail("timed out")
        time.sleep(0.05)


def test_monitor_auto_takes_the_space_and_delivers_events(lab61: Lab, vm: VM) -> None:
    seen: list[vmshield.Event] = []
    mon = Monitor(vm, [_req(vm)])
    unsubscribe = mon.subscribe(seen.append)
    read: list[vmshield.Event] = []
    with mon:
        reader = _collect(mon, read)
        assert mon.engine_kind == EngineKind.SPACE
        lab61.sh("vmstest open /etc/shadow")
        _wait(lambda: seen)
        unsubscribe()
    reader.join(10)
    assert not reader.is_alive()  # events() ends after stop()
    assert seen[0].object == "file.open" and seen[0].fields["path"] == "/etc/shadow"
    assert [e.request for e in read] == [e.request for e in seen]
    summary = mon.summary()
    assert summary.engine == "space" and summary.events >= 1 and summary.by_object["file.open"]


def test_monitor_auto_falls_back_to_exits_and_says_why(lab61: Lab, vm: VM) -> None:
    notes: list[str] = []
    req = IsolationRequest(vm=vm.name, object="ufunc:/bin/vmstest-pie:vms_ufunc_target")
    lab61.sh("vmstest-pie ufunc-loop 40 > /dev/null 2>&1 & sleep 1")
    mon = Monitor(vm, [req], notes=notes.append)
    with mon:
        assert mon.engine_kind == EngineKind.EXIT
    assert any("engine auto: using exit" in n for n in notes)


def test_bad_requests_carry_what_is_wrong(vm: VM) -> None:
    with pytest.raises(vmshield.RequestError, match="no filter 'color'"):
        Monitor(vm, [IsolationRequest(vm=vm.name, object="file.open", filters={"color": "x"})])
    with pytest.raises(vmshield.ChoiceError) as ei:
        Monitor(vm, [_req(vm)], engine="warp")
    assert ei.value.what == "engine" and ei.value.value == "warp" and "space" in ei.value.choices
    with pytest.raises(vmshield.VmshieldError, match="cannot take action 'deny'"):
        Monitor(vm, [_req(vm, "process.exec", action="deny")])


def test_tamper_switch_moves_the_requests_to_exits(lab61: Lab, vm: VM) -> None:
    """A changed config byte (written from the host, as a guest kernel could) with the
    exit policy: the space is removed and the next event comes from a breakpoint."""
    notes: list[str] = []
    events: list[vmshield.Event] = []
    mon = Monitor(vm, [_req(vm)], engine="space", on_tamper=TamperPolicy.EXIT,
                  check_interval=0.2, notes=notes.append)  # fmt: skip
    mon.subscribe(events.append)
    with mon:
        eng = mon.engine
        assert eng is not None and eng.kind == EngineKind.SPACE
        space = eng.space  # type: ignore[union-attr]
        assert space is not None and space.region is not None
        r = space.region
        pa = r.pages[r.text_pages]
        assert vm.target is not None
        old = vm.target.mem.read(pa, 1)
        vm.target.mem.write(pa, bytes([old[0] ^ 0x5A]))
        _wait(lambda: mon.fell_back, timeout=60)
        assert mon.engine_kind == EngineKind.EXIT
        lab61.sh("vmstest open /etc/shadow")
        _wait(lambda: any(e.point.engine == "exit" for e in events), timeout=60)
    assert any(e.object == "space.integrity" for e in events)
    assert any("continue on the exit engine" in n for n in notes)
    assert mon.summary().engine == "exit"
