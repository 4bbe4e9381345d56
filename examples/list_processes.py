"""List the processes of a VM, from its memory alone (no guest login, nothing installed).

    python examples/list_processes.py VM

VM is a lab VM name, the path of a QEMU QMP socket, or a QEMU ELF dump.
"""

from __future__ import annotations

import sys

import vmshield
from vmshield.text import term


def main(target: str) -> None:
    with vmshield.open_vm(target) as vm:
        print(f"{vm.kernel.release}: {len(vm.kernel.symbols)} kernel symbols")
        for task in vm.ps():
            # Guest strings are the guest's to choose: escape them for the terminal.
            print(f"{task.pid:>6} {task.ppid:>6} {task.uid:>5} {term(task.name)}")


if __name__ == "__main__":
    main(sys.argv[1])
