"""Attach-to-ready time per kernel: cold (empty symbol cache) and cached.

Boots one lab VM per kernel, then times ``Kernel.attach`` (QMP connect, RAM map, page
walk, kallsyms locate + decode or cache load, anchor checks) in this process, and the
whole ``vmshield kernel NAME --json`` command (Python start-up included) for reference.
Run: ``.venv/bin/python bench/attach.py [--runs N] [--kernels 5.10,6.1,6.12,7.3]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from vmshield import open_vm
from vmshield.guest.symcache import SymbolCache
from vmshield.lab import vm as labvm
from vmshield.lab.kernels import KNOWN_KERNELS


def attach_once(name: str, cache: SymbolCache) -> tuple[float, bool]:
    t0 = time.perf_counter()
    with open_vm(name, cache=cache) as vm:
        cached = vm.kernel.stats.cached
    return time.perf_counter() - t0, cached


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--kernels", default=",".join(KNOWN_KERNELS))
    args = ap.parse_args()
    os.environ.setdefault("VMSHIELD_RUN", tempfile.mkdtemp(prefix="vmshield-bench-"))
    table = Table(title="attach to ready (median of runs)")
    for col in ("kernel", "symbols", "cold s", "cached s", "speed-up", "CLI `symbols` (cached) s"):
        table.add_column(col, justify="right")
    for kernel in args.kernels.split(","):
        name = f"bench-{kernel}"
        labvm.start(name, kernel)
        try:
            cold, warm, cli = [], [], []
            for _ in range(args.runs):
                with tempfile.TemporaryDirectory() as d:
                    cache = SymbolCache(Path(d))
                    s, cached = attach_once(name, cache)
                    assert not cached
                    cold.append(s)
                    for _ in range(2):
                        s, cached = attach_once(name, cache)
                        assert cached
                        warm.append(s)
            for _ in range(args.runs):
                t0 = time.perf_counter()
                subprocess.run(
                    [sys.executable, "-m", "vmshield", "symbols", name, "^_text$"],
                    check=True,
                    capture_output=True,
                )
                cli.append(time.perf_counter() - t0)
            with open_vm(name) as vm:
                nsyms = len(vm.kernel.symbols)
        finally:
            labvm.stop(name)
        c, w = statistics.median(cold), statistics.median(warm)
        table.add_row(
            kernel, str(nsyms), f"{c:.3f}", f"{w:.3f}", f"{c / w:.1f}x",
            f"{statistics.median(cli):.3f}",
        )  # fmt: skip
    Console().print(table)


if __name__ == "__main__":
    main()
