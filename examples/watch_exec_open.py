"""Watch program starts and file opens in a VM for a while, one line each.

    python examples/watch_exec_open.py VM [SECONDS]

The security space is used when it can serve the requests (no VM exit per event).
"""

from __future__ import annotations

import sys

import vmshield
from vmshield.text import term


def main(target: str, seconds: float = 60.0) -> None:
    with vmshield.open_vm(target) as vm:
        requests = [
            vmshield.IsolationRequest(vm=vm.name, object="process.exec"),
            vmshield.IsolationRequest(vm=vm.name, object="file.open"),
        ]
        with vmshield.Monitor(vm, requests, notes=print) as mon:
            print(f"watching with the {mon.engine_kind} engine for {seconds:g} s", flush=True)
            events = mon.events()
            mon.wait(seconds)
            mon.stop()
            for ev in events:
                what = ev.fields.get("filename") or ev.fields.get("path")
                who = ev.process.comm if ev.process else "?"
                print(f"{ev.object:<13} {term(who):<16} {term(str(what))}", flush=True)
        s = mon.summary()
        print(f"{s.events} events on the {s.engine} engine, {s.drops} dropped")


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]) if len(sys.argv) > 2 else 60.0)
