"""The ``vmshield`` command line: lab VMs and introspection of any QEMU guest.

Every command that names a VM accepts a lab VM name or the path of any QEMU's QMP
socket. Errors print one line naming the problem and exit with status 2; ``--json``
prints machine-readable output.
"""

from __future__ import annotations

import json
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from vmshield import open_vm
from vmshield.cli import service
from vmshield.cli.oneline import OneLineErrors, seconds
from vmshield.errors import VmshieldError
from vmshield.hv.target import Target
from vmshield.lab import vm as labvm
from vmshield.text import cell, term

# Help texts are docstrings: markdown mode reflows their paragraphs (no line broken
# mid-sentence) and shows ``names`` as code rather than raw backticks.
app = typer.Typer(
    no_args_is_help=True, add_completion=False, help=__doc__, cls=OneLineErrors,
    rich_markup_mode="markdown",
)  # fmt: skip
vm_app = typer.Typer(
    no_args_is_help=True, help="Lab VMs that vmshield boots itself.", rich_markup_mode="markdown"
)
app.add_typer(vm_app, name="vm")
space_app = typer.Typer(
    no_args_is_help=True,
    help="The in-guest security space: build it, look at it, remove it.",
    rich_markup_mode="markdown",
)
app.add_typer(space_app, name="space")
# Markup off: arguments and guest strings are text, never Rich markup (a '[/x]' would
# crash the print). Guest-controlled strings also go through vmshield.text.term.
out = Console(markup=False)
err = Console(stderr=True, markup=False)

F = TypeVar("F", bound=Callable[..., Any])
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
VmArg = Annotated[
    str, typer.Argument(help="Lab VM name, a QEMU QMP socket path, or a QEMU ELF dump.")
]
SymbolsOpt = Annotated[
    Path | None,
    typer.Option(
        "--symbols",
        help="Kernel symbols from this file (System.map, a /proc/kallsyms copy or a "
        "Volatility 3 ISF) instead of kallsyms from guest memory, or 'guest-agent[:SOCKET]' "
        "for the guest's own /proc/kallsyms through its guest agent; rebased by the KASLR "
        "slide and checked against guest memory.",
    ),
]


def _fail(e: Exception) -> None:
    """One line on stderr (control characters escaped, no wrapping), exit status 2."""
    err.print(Text("error:", style="red") + Text(f" {term(e)}"), highlight=False, soft_wrap=True)
    raise typer.Exit(2)


@contextmanager
def _errors() -> Iterator[None]:
    try:
        yield
    except VmshieldError as e:
        _fail(e)


def _note(text: str) -> None:
    err.print(text, highlight=False, soft_wrap=True, markup=False)


def _print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=1) + "\n")


# -- lab VMs -------------------------------------------------------------------------


@vm_app.command("start")
def vm_start(
    name: str,
    kernel: Annotated[str, typer.Option(help="5.10, 6.1, 6.12 or a bzImage path.")] = "6.1",
    memory: Annotated[int, typer.Option(help="Guest RAM in MiB.")] = 512,
    cpus: Annotated[int, typer.Option(help="vCPUs.")] = 1,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the shell.")] = 180,
    as_json: JsonOpt = False,
) -> None:
    """Boot a lab VM in the background; returns when its shell is up."""
    t0 = time.monotonic()
    with _errors():
        seconds("--timeout", timeout)
        info = labvm.start(name, kernel, memory, cpus, timeout)
    if as_json:
        _print_json(asdict(info) | {"boot_seconds": round(time.monotonic() - t0, 2)})
    else:
        out.print(
            f"VM {term(name)} is up: kernel {term(info.kernel)}, {info.memory} MiB, "
            f"{info.cpus} vCPU, {info.accel}, pid {info.pid} ({time.monotonic() - t0:.1f} s)"
        )


@vm_app.command("list")
def vm_list(as_json: JsonOpt = False) -> None:
    """Lab VMs and whether they run."""
    vms = labvm.list_vms()
    if as_json:
        _print_json([asdict(i) | {"running": r} for i, r in vms])
        return
    table = Table("name", "kernel", "memory", "cpus", "accel", "pid", "state")
    for i, r in vms:
        table.add_row(
            cell(i.name), cell(i.kernel), str(i.memory), str(i.cpus), cell(i.accel), str(i.pid),
            "running" if r else "stopped",
        )  # fmt: skip
    out.print(table)


@vm_app.command("stop")
def vm_stop(name: str) -> None:
    """Stop a lab VM and remove its run files."""
    with _errors():
        was_running = labvm.stop(name)
    out.print(f"VM {term(name)} {'stopped' if was_running else 'was not running; cleaned up'}")


@vm_app.command("run", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def vm_run(
    name: str,
    command: Annotated[list[str], typer.Argument(help="Shell command (after --).")],
    timeout: Annotated[float, typer.Option(help="Seconds before giving up.")] = 60,
) -> None:
    """Run a shell command in a lab VM over its serial console (lab-only helper).

    Prints the command's output and exits with its exit status.
    """
    with _errors():
        seconds("--timeout", timeout)
        res = labvm.LabVM(name).run(" ".join(command), timeout)
    sys.stdout.write(res.output)
    raise typer.Exit(res.status)


# -- introspection -------------------------------------------------------------------


@app.command()
def kernel(target: VmArg, as_json: JsonOpt = False, symbols_file: SymbolsOpt = None) -> None:
    """The guest kernel: version, KASLR slide, symbol and BTF type counts."""
    t0 = time.perf_counter()
    with _errors(), open_vm(target, symbols=symbols_file, notes=_note) as vm:
        k = vm.kernel
        attach_s = time.perf_counter() - t0
        btf_types = k.btf.type_count
        info = {
            "vm": target,
            "version": k.banner,
            "release": k.release,
            "kaslr_slide": f"{k.slide:#x}",
            "text": f"{k.text:#x}",
            "symbols": len(k.symbols),
            "btf_types": btf_types,
            "memory_access": vm.target.memory_kind if vm.target else "dump",
            "cached": k.stats.cached,
            "attach_seconds": round(attach_s, 4),
            "total_seconds": round(time.perf_counter() - t0, 4),
        }
    if as_json:
        _print_json(info)
        return
    table = Table(show_header=False)
    for key, v in info.items():
        table.add_row(key, cell(v))
    out.print(table)


@app.command()
def symbols(
    target: VmArg,
    regex: Annotated[str | None, typer.Argument(help="Only names matching this.")] = None,
    as_json: JsonOpt = False,
    symbols_file: SymbolsOpt = None,
) -> None:
    """Kernel symbols in /proc/kallsyms format: ADDRESS TYPE NAME."""
    try:
        re.compile(regex or "")  # checked before attaching
    except re.error as e:
        _fail(VmshieldError(f"bad regex {regex!r}: {e}"))
        return
    with _errors(), open_vm(target, symbols=symbols_file, notes=_note) as vm:
        rows = [(s.address, s.type, s.name) for s in vm.symbols(regex)]
    if as_json:
        _print_json([{"address": f"{a:016x}", "type": ty, "name": n} for a, ty, n in rows])
        return
    sys.stdout.write("".join(f"{a:016x} {term(ty)} {term(n)}\n" for a, ty, n in rows))


@app.command()
def ps(target: VmArg, as_json: JsonOpt = False, symbols_file: SymbolsOpt = None) -> None:
    """Processes of the guest (pid, ppid, uid, comm), walked from init_task."""
    with _errors(), open_vm(target, symbols=symbols_file, notes=_note) as vm:
        ts = vm.ps()  # with the VM paused: a consistent list
    if as_json:
        _print_json(
            [
                {
                    "pid": x.pid, "ppid": x.ppid, "uid": x.uid, "euid": x.euid, "gid": x.gid,
                    "comm": x.comm, "name": x.name, "kernel_thread": x.kernel_thread,
                    "task": f"{x.address:#x}",
                } | ({"error": x.error} if x.error else {})
                for x in ts
            ]
        )  # fmt: skip
        return
    table = Table("PID", "PPID", "UID", "COMM", box=None)
    for x in ts:
        if x.error:  # listed, not dropped: the walk went on past it
            table.add_row("?", "?", "?", cell(f"<unreadable task {x.address:#x}: {x.error}>"))
            continue
        comm = f"[{x.name}]" if x.kernel_thread else x.name
        table.add_row(str(x.pid), str(x.ppid), str(x.uid), cell(comm))
    out.print(table)


@app.command()
def modules(target: VmArg, as_json: JsonOpt = False, symbols_file: SymbolsOpt = None) -> None:
    """Loaded kernel modules (name, state, base, size)."""
    with _errors(), open_vm(target, symbols=symbols_file, notes=_note) as vm:
        ms = vm.modules()
    if as_json:
        _print_json(
            [
                {"name": m.name, "state": m.state, "base": f"{m.base:#x}", "size": m.size}
                | ({"address": f"{m.address:#x}", "error": m.error} if m.error else {})
                for m in ms
            ]
        )
        return
    table = Table("NAME", "STATE", "BASE", "SIZE", box=None)
    for m in ms:
        if m.error:
            table.add_row(cell(f"<unreadable module {m.address:#x}: {m.error}>"), "?", "?", "?")
            continue
        table.add_row(cell(m.name), cell(m.state), f"{m.base:#x}", str(m.size))
    out.print(table)


@app.command()
def monitor(
    target: VmArg,
    objects: Annotated[
        list[str],
        typer.Option(
            "--object",
            "-o",
            help="Isolation object, optionally with its own filters and action: "
            "OBJ[,KEY=VALUE...][,action=A] (repeatable).",
        ),
    ],
    filters: Annotated[
        list[str] | None, typer.Option("--filter", "-f", help="KEY=VALUE (repeatable).")
    ] = None,
    action: Annotated[
        str, typer.Option(help="log, deny, kill, pause, dump or restore (integrity objects).")
    ] = "log",
    as_json: JsonOpt = False,
    duration: Annotated[float | None, typer.Option(help="Stop after S seconds.")] = None,
    engine: Annotated[
        str,
        typer.Option(
            help="space (in-guest agent, no VM exit per event), exit (a breakpoint stop "
            "per event) or auto (space when it can serve every request, else exit)."
        ),
    ] = "auto",
    dump_dir: Annotated[Path, typer.Option(help="Where the dump action writes.")] = Path("."),
    dump_interval: Annotated[
        float, typer.Option(help="At most one dump per this many seconds for each request.")
    ] = 10.0,
    check_interval: Annotated[
        float, typer.Option(help="Security space: seconds between full integrity checks.")
    ] = 1.0,
    on_tamper: Annotated[
        str,
        typer.Option(
            help="Security space, when it is tampered with: rearm (write our bytes "
            "back), alert (report only) or exit (remove it, continue on the exit engine)."
        ),
    ] = "rearm",
    ring_size: Annotated[
        str | None,
        typer.Option(
            help="Security space: bytes of event records per vCPU (SIZE, SIZEK or SIZEM; "
            "a power of two from 64K to 256M). Default: sized from guest RAM."
        ),
    ] = None,
    aggregate: Annotated[
        float | None,
        typer.Option(
            help="Security space: count hits in the guest per (object, task, comm, key: "
            "path, address:port, new euid or module name) "
            "instead of an event each, one space.aggregate event every S seconds (log "
            "requests whose filters the agent evaluates)."
        ),
    ] = None,
    symbols_file: SymbolsOpt = None,
) -> None:
    """Arm monitoring points for isolation objects and stream their events.

    --filter and --action apply to every --object; an object's own KEY=VALUE and
    action=A (after commas) add to or override them. Writes 'armed' to stderr when the
    points are in place; detaches cleanly on exit, Ctrl-C or SIGTERM, then prints a
    summary.
    """
    import faulthandler
    import signal as _signal

    from vmshield.cli import checks
    from vmshield.cli.render import event_line
    from vmshield.monitor.events import Event
    from vmshield.monitor.kinds import EngineKind, TamperPolicy, parse_choice
    from vmshield.monitor.session import Monitor
    from vmshield.monitor.space_engine import SpaceEngine

    with _errors():  # everything that needs no VM, before anything is attached
        parse_choice(EngineKind, engine, "engine")
        parse_choice(TamperPolicy, on_tamper, "tamper policy")
        seconds("--duration", duration, optional=True)
        seconds("--check-interval", check_interval)
        if not dump_interval >= 0:
            raise VmshieldError(f"--dump-interval {dump_interval}: must be 0 or more seconds")
        wanted = checks.requests(target, objects, filters or [], action)
        ring_bytes = checks.ring_size(ring_size) if ring_size is not None else None
        seconds("--aggregate", aggregate, optional=True)
    stop = threading.Event()

    def _on_signal(signum: int, _frame: object) -> None:
        stop.set()

    def note(text: str) -> None:
        err.print(term(text), highlight=False, soft_wrap=True)

    table_console = Console(highlight=False, markup=False)

    def emit(ev: Event) -> None:
        table_console.print(event_line(ev), soft_wrap=True)

    def emit_line(line: str) -> None:
        # Flushed once per drain batch (subscribe_json's flush), not per line: a burst
        # of hundreds of thousands of events must not cost a write(2) each.
        sys.stdout.write(line + "\n")

    with _errors(), open_vm(target, symbols=symbols_file, notes=_note) as vm:
        vm.require_live("monitor")  # before any signal handler is set: one clean line
        faulthandler.register(_signal.SIGUSR1)  # `kill -USR1 PID` prints where a monitor is
        _signal.signal(_signal.SIGTERM, _on_signal)
        _signal.signal(_signal.SIGINT, _on_signal)
        mon = Monitor(
            vm, wanted, engine=engine, on_tamper=on_tamper,
            dump_dir=dump_dir, dump_interval=dump_interval, check_interval=check_interval,
            notes=note, ring_size=ring_bytes, aggregate=aggregate,
        )  # fmt: skip
        if as_json:
            mon.subscribe_json(emit_line, sys.stdout.flush)
        else:
            mon.subscribe(emit)
        mon.start(duration)
        try:
            eng = mon.engine
            if isinstance(eng, SpaceEngine) and eng.space and eng.space.region:
                r = eng.space.region
                note(
                    f"security space at {r.base:#x}: {r.text_pages} code page(s) (RO+X), "
                    f"{r.config_pages} config page(s) (RO+NX), {r.ncpus} per-CPU ring(s) "
                    f"of {r.ring_stride >> 10} KiB"
                )
            points = ", ".join(f"{r.request.object}@{r.point.symbol}" for r in mon.resolved)
            note(f"armed {len(mon.resolved)} point(s) (engine {mon.engine_kind}): {points}")
            while not mon.wait(0.2) and not stop.is_set():
                pass
        finally:
            mon.stop()
            _print_summary(mon.summary(), as_json)


def _print_summary(s: Any, as_json: bool) -> None:
    """The monitor's summary on stderr: events per object (unless --json), then one line."""
    summary = Table(title="summary", box=None)
    summary.add_column("object")
    summary.add_column("events", justify="right")
    for name, count in sorted(s.by_object.items()):
        summary.add_row(cell(name), str(count))
    if not as_json:
        err.print(summary)
    cost = (
        f"no VM exit per event, {s.drops} dropped, {s.alerts} integrity alerts"
        if s.engine == "space"
        else f"{s.round_trips_per_hit:.1f} gdbstub round trips per hit"
    )
    err.print(
        f"detached: {s.hits} hits, {s.events} events, {s.filtered} filtered, "
        f"{s.decode_errors} with decode errors, {cost}",
        highlight=False,
        soft_wrap=True,
    )


@app.command()
def catalog(as_json: JsonOpt = False) -> None:
    """The isolation objects: points, fields, filters and allowed actions."""
    from vmshield.objects.catalog import CATALOG, INTEGRITY

    rows = [
        {
            "object": o.name, "summary": o.summary, "points": list(o.candidates),
            "fields": list(o.fields), "filters": list(o.filters), "actions": list(o.actions),
        }
        for o in CATALOG.values()
    ]  # fmt: skip
    rows += [
        {
            "object": o.name, "summary": o.summary, "points": ["host check"],
            "fields": list(o.fields), "filters": list(o.filters), "actions": list(o.actions),
        }
        for o in INTEGRITY.values()
    ]  # fmt: skip
    rows.append(
        {
            "object": "kfunc:SYMBOL", "summary": "any traceable kernel function",
            "points": ["SYMBOL"], "fields": ["args"], "filters": ["pid", "comm", "uid"],
            "actions": ["log", "kill", "pause", "dump", "deny (security_* only)"],
        }
    )  # fmt: skip
    rows.append(
        {
            "object": "process:PID|COMM", "summary": "every behaviour above, of one process",
            "points": [], "fields": [], "filters": [], "actions": ["per object"],
        }
    )  # fmt: skip
    if as_json:
        _print_json(rows)
        return
    table = Table("object", "points", "fields", "filters", "actions")
    for r in rows:
        table.add_row(*(cell(", ".join(r[k]) if isinstance(r[k], list) else str(r[k]))
                        for k in ("object", "points", "fields", "filters", "actions")))  # fmt: skip
    out.print(table)


@app.command()
def detach(target: VmArg, symbols_file: SymbolsOpt = None) -> None:
    """Clear vmshield's monitoring points from a VM (after a monitor was killed): the
    exit engine's breakpoints, and a security space with its patched sites."""
    with _errors():
        if _destroy_space(target, required=False, symbols_file=symbols_file):
            out.print(f"{term(target)}: security space removed")
    with _errors(), Target(target) as t:
        state = t.gdb_path().with_suffix(".armed.json")
        stub = t.gdbstub()
        try:
            stub.detach()  # QEMU removes every breakpoint and resumes the guest
        finally:
            stub.close()
        state.unlink(missing_ok=True)
        if not t.qmp.running():
            t.qmp.cont()
    out.print(f"{term(target)}: monitoring points cleared, guest running")


@space_app.command("build")
def space_build(target: VmArg, as_json: JsonOpt = False, symbols_file: SymbolsOpt = None) -> None:
    """Build the security space in a running guest and leave it there (monitors with
    --engine space then use it instead of building their own)."""
    from vmshield.space.borrow import borrowed
    from vmshield.space.space import SecuritySpace

    with _errors(), open_vm(target, symbols=symbols_file, notes=_note) as vm:
        t, k = vm.require_live("space build"), vm.kernel
        if SecuritySpace.load_state(t, k) is not None:
            raise VmshieldError(f"{target} already has a security space (vmshield space status)")
        sp = SecuritySpace(t, k)
        with borrowed(t, k, "build") as b:
            sp.build(b, len(b.stub.threads()))
            sp.owned = False
            sp.save_state()
        _space_report(sp, as_json)


@space_app.command("status")
def space_status(target: VmArg, as_json: JsonOpt = False, symbols_file: SymbolsOpt = None) -> None:
    """Where the security space is, its patched sites, ring counters, integrity."""
    from vmshield.space.space import SecuritySpace

    with _errors(), open_vm(target, symbols=symbols_file, notes=_note) as vm:
        t, k = vm.require_live("space status"), vm.kernel
        sp = SecuritySpace.load_state(t, k)
        if sp is None:
            raise VmshieldError(f"{target} has no security space (vmshield space build)")
        _space_report(sp, as_json)


def _space_report(sp: Any, as_json: bool) -> None:
    r = sp.region
    info = {
        "base": f"{r.base:#x}", "code_pages": r.text_pages, "config_pages": r.config_pages,
        "cpus": r.ncpus, "ring_bytes": r.ring_stride, "owned_by_monitor": sp.owned,
        "sites": [{"symbol": s.symbol, "address": f"{s.address:#x}", "live": s.live}
                  for s in sp.sites],
        "counters": sp.counters(),
    }  # fmt: skip
    if as_json:
        _print_json(info)
        return
    out.print(
        f"security space at {info['base']}: {r.text_pages} code + {r.config_pages} config "
        f"page(s), {r.ncpus} ring(s); counters {term(info['counters'])}",
        highlight=False,
        soft_wrap=True,
    )
    for site in info["sites"]:
        out.print(
            f"  {term(site['symbol'])} {site['address']} live={site['live']}", highlight=False
        )


@space_app.command("destroy")
def space_destroy(target: VmArg, symbols_file: SymbolsOpt = None) -> None:
    """Unpatch every site, free the security space and leave no trace."""
    with _errors():
        if _destroy_space(target, required=True, symbols_file=symbols_file):
            out.print(f"{term(target)}: security space removed")


def _destroy_space(target: str, required: bool, symbols_file: Path | None = None) -> bool:
    from vmshield.space.borrow import borrowed, journal_path, recover_orphaned_call
    from vmshield.space.errors import StaleSpace
    from vmshield.space.space import SecuritySpace

    with _errors(), open_vm(target, symbols=symbols_file, notes=_note) as vm:
        t, k = vm.require_live("removing what a monitor left"), vm.kernel
        if journal_path(t).exists():  # a monitor died while the guest ran its call
            done = recover_orphaned_call(t, k)
            if done is not None:
                out.print(
                    f"{target}: finished the {done.purpose} call to {done.function} that a "
                    f"killed vmshield (pid {done.pid}) left running; task restored",
                    highlight=False,
                    soft_wrap=True,
                )
        sp = SecuritySpace.load_state(t, k)
        if sp is None:
            if required:
                raise VmshieldError(f"{target} has no security space")
            return False
        if other := sp.in_use_by():
            raise VmshieldError(
                f"{target}: a running monitor (pid {other}) uses the security space; stop it "
                "first (it removes what it built when it exits)"
            )
        try:
            with borrowed(t, k, "teardown") as b:
                sp.destroy(b)
        except StaleSpace as e:  # borrowed() let the VM run on
            out.print(f"{term(target)}: {term(e)}", highlight=False, soft_wrap=True)
            return False
        for sym in sp.left_disabled:
            out.print(
                f"{term(target)}: {term(sym)}: FTRACE_FL_DISABLED left set "
                "(guest ftrace users active)",
                soft_wrap=True,
            )
        return True


@app.command()
def resume(target: VmArg) -> None:
    """Resume a VM that a pause action stopped."""
    with _errors(), Target(target) as t:
        t.qmp.cont()
    out.print(f"{term(target)}: running")


from vmshield.cli.doctor import doctor as _doctor  # noqa: E402  (doctor uses this module)

app.command("doctor")(_doctor)

service.register(app)


def main() -> None:
    app()
