"""``vmshield doctor VM``: what vmshield found in this guest kernel, and what it can do.

Why: a kernel that no test names (another Debian flavour, a newer release) either works
or fails somewhere deep inside a monitor. The doctor runs every lookup a monitor would,
each on its own, and reports what was found (symbol source, kallsyms layout, BTF, KASLR,
PTI, IBT, the ftrace NOP), and for each catalog object whether the exit engine and the
security space can serve it, with the reason when not. It only reads guest memory.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from vmshield.errors import VmshieldError
from vmshield.guest.kernel import Kernel

X86_FEATURE_PTI = 7 * 32 + 11
"""``X86_FEATURE_PTI`` (arch/x86/include/asm/cpufeatures.h, unchanged since 4.15): the
kernel sets it in ``boot_cpu_data.x86_capability`` when page-table isolation is on."""
CR4_CET = 1 << 23
ENDBR64 = bytes.fromhex("f30f1efa")

SPACE_NEEDS = (
    ("execmem_alloc", "module_alloc"),
    ("execmem_free", "module_memfree"),
    ("set_memory_rox", "set_memory_x"),
    ("set_memory_ro",),
    ("set_memory_nx",),
    ("set_memory_rw",),
    ("synchronize_rcu_tasks_rude", "synchronize_rcu_tasks", "synchronize_rcu"),
    ("ftrace_pages_start",),
    ("page_offset_base",),
)
"""Kernel symbols the security space calls or reads (one of each group)."""


def _row(rows: list[dict[str, str]], what: str, found: str, note: str = "") -> None:
    rows.append({"what": what, "found": found, "note": note})


def _try(fn: Any) -> tuple[Any, str]:
    """(value, "") or (None, the reason it failed)."""
    try:
        return fn(), ""
    except (VmshieldError, KeyError, ValueError, IndexError) as e:
        return None, str(e)


def _pti(k: Kernel) -> str:
    caps = k.symbols.address("boot_cpu_data") + k.member_offset("cpuinfo_x86", "x86_capability")
    word = k.u32(caps + 4 * (X86_FEATURE_PTI // 32))
    return "on" if word >> (X86_FEATURE_PTI % 32) & 1 else "off"


def _ftrace_nop(k: Kernel) -> str:
    from vmshield.guest.ftrace import place_point

    p = place_point(k, "security_file_open")
    pad = k.read(p.function, p.address - p.function)
    nop = k.read(p.address, 5).hex(" ")
    kind = {"0f 1f 44 00 00": "P6 nopl", "66 66 66 66 90": "K8 prefixed nop"}.get(nop, "?")
    lead = "" if not pad else ("endbr64 + " if pad == ENDBR64 else f"sealed endbr {pad.hex()} + ")
    return f"{lead}{nop} ({kind})"


def _space_symbols(k: Kernel) -> tuple[list[str], list[str]]:
    """(missing kernel symbols, the agent's imports this kernel lacks)."""
    from vmshield.space import agent as agentlib

    missing = [" or ".join(g) for g in SPACE_NEEDS if not any(s in k.symbols for s in g)]
    needed: list[str] = []

    def record(name: str) -> int:
        needed.append(name)
        return 0xFFFFFFFFC0000000

    stand_in = 0xFFFFFFFFC0000000
    agentlib.link(agentlib.build().read_bytes(), stand_in, stand_in + (1 << 24), record)
    return missing, [n for n in dict.fromkeys(needed) if n not in k.symbols]


def diagnose(vm: str, t: Any, k: Kernel, cr4: int) -> dict[str, Any]:
    """Everything the doctor reports, as data (``--json`` prints it as is)."""
    from vmshield.guest.kconsts import tif_sigpending_bit
    from vmshield.guest.tasks import current_task_offset
    from vmshield.monitor.request import IsolationRequest, resolve
    from vmshield.monitor.space_engine import unsupported
    from vmshield.objects.catalog import CATALOG, plan_for

    rows: list[dict[str, str]] = []
    _row(rows, "kernel", k.release)
    _row(rows, "symbol source", k.symbol_source, f"{len(k.symbols)} symbols")
    if k.symbol_source == "kallsyms":
        _row(rows, "kallsyms layout", k.kallsyms_layout or "?")
    _row(rows, "KASLR", f"slide {k.slide:#x}", f"_text {k.text:#x} (from the page tables)")
    btf, why = _try(lambda: k.btf.type_count)
    _row(rows, "BTF", f"{btf} types" if btf else "missing", why)
    pti, why = _try(lambda: _pti(k))
    _row(rows, "PTI", pti or "unknown", why or "X86_FEATURE_PTI in boot_cpu_data")
    entry, _ = _try(lambda: k.read(k.symbols.address("commit_creds"), 4))
    built = entry == ENDBR64 or (entry is not None and entry[:3] == b"\x0f\x1f\x40")
    _row(
        rows,
        "IBT",
        ("built in" if built else "not built in")
        + (", enforced (CR4.CET)" if cr4 & CR4_CET else ", not enforced (CR4.CET off)"),
    )
    nop, why = _try(lambda: _ftrace_nop(k))
    _row(rows, "ftrace NOP", nop or "not found", why)
    cur, why = _try(lambda: current_task_offset(k))
    _row(rows, "current task", f"per-cpu {cur:#x}" if cur is not None else "not found", why)
    tif, why = _try(lambda: tif_sigpending_bit(k))
    _row(rows, "TIF_SIGPENDING", str(tif) if tif is not None else "not found", why)
    alloc = "execmem_alloc" if "execmem_alloc" in k.symbols else "module_alloc"
    space_why = ""
    got, why = _try(lambda: _space_symbols(k))
    if got is None:
        space_why = why
    else:
        missing, imports = got
        if missing or imports:
            space_why = "missing " + ", ".join(missing + imports)
    if not space_why and tif is None:
        space_why = "TIF_SIGPENDING unknown"
    _row(
        rows, "security space", "available" if not space_why else "unavailable", space_why or alloc
    )

    objects = []
    for name in [*CATALOG, "kfunc:__x64_sys_getpid"]:
        req = IsolationRequest(vm=vm, object=name)
        r, exit_why = _try(lambda req=req: resolve(req, k))
        space = "no"
        reason = exit_why
        if r is not None:
            problem = space_why or unsupported([r])
            if not problem:
                _, problem = _try(lambda name=name: plan_for(name, k))
            space = "yes" if not problem else "no"
            reason = problem or ""
        objects.append(
            {
                "object": name,
                "point": f"{r.point.symbol} {r.point.address:#x}" if r is not None else "",
                "exit": "yes" if r is not None else "no",
                "space": space,
                "why_not": reason,
            }
        )
    return {"vm": vm, "kernel": rows, "objects": objects}


def doctor(
    target: Annotated[
        str, typer.Argument(help="Lab VM name, a QEMU QMP socket path, or a QEMU ELF dump.")
    ],
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    symbols_file: Annotated[
        Path | None,
        typer.Option("--symbols", help="Symbols from this file instead of guest memory."),
    ] = None,
) -> None:
    """What vmshield finds in this guest kernel, which objects and engines it can use
    here, and why not when it cannot."""
    from vmshield import open_vm
    from vmshield.cli import main as cli

    t0 = time.perf_counter()
    with cli._errors():
        if symbols_file is None and not Path(target).is_file():
            from vmshield.hv.target import Target

            with Target(target) as t:
                cpu = t.cpus()[0]
                k = Kernel.attach(t.mem.read, cpu.cr3, cpu.cr4, None)  # fresh: the layout
                info = diagnose(target, t, k, cpu.cr4)
        else:
            with open_vm(target, symbols=symbols_file, notes=cli._note) as vm:
                cr4 = vm.target.cpus()[0].cr4 if vm.target is not None else 0
                info = diagnose(target, vm.target, vm.kernel, cr4)
    info["seconds"] = round(time.perf_counter() - t0, 3)
    if as_json:
        cli._print_json(info)
        return
    table = Table(
        "what",
        "found",
        "exit",
        "space",
        "note / why not",
        title=f"vmshield doctor {escape(target)}",
    )
    for r in info["kernel"]:
        table.add_row(escape(r["what"]), escape(r["found"]), "", "", escape(r["note"]))
    table.add_section()
    for o in info["objects"]:
        table.add_row(
            escape(o["object"]), escape(o["point"]), o["exit"], o["space"], escape(o["why_not"])
        )
    cli.out.print(table)
