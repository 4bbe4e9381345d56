"""Deny outgoing connections to one port in a VM and count the attempts.

    python examples/deny_connects.py VM PORT [SECONDS]

Each connect() to PORT fails with EPERM inside the guest; the script prints who tried.
"""

from __future__ import annotations

import sys
from collections import Counter

import vmshield
from vmshield.text import term


def main(target: str, port: int, seconds: float = 60.0) -> None:
    tries: Counter[str] = Counter()
    with vmshield.open_vm(target) as vm:
        req = vmshield.IsolationRequest(
            vm=vm.name, object="net.connect", filters={"port": str(port)},
            action=vmshield.Action.DENY,
        )  # fmt: skip
        with vmshield.Monitor(vm, [req]) as mon:
            mon.subscribe(lambda ev: tries.update([ev.process.comm if ev.process else "?"]))
            print(f"denying connects to port {port} for {seconds:g} s", flush=True)
            mon.wait(seconds)
    for comm, n in tries.most_common():
        print(f"{n:>5} denied connect(s) from {term(comm)}")
    print(f"total: {sum(tries.values())}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]) if len(sys.argv) > 3 else 60.0)
