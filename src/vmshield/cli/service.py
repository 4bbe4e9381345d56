"""The daemon and its clients: `vmshield daemon`, `token create`, `vms`, `isolate`,
`release`, `events`.

Why a separate module: these commands talk to a daemon over HTTP (httpx, a Unix socket
or TCP) instead of attaching to a VM, and share the client options (--daemon, --token).
Guest strings are printed as JSON (escaped) or with control characters escaped, never raw.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer

from vmshield.errors import VmshieldError

ENV_DAEMON = "VMSHIELD_DAEMON"
ENV_TOKEN = "VMSHIELD_TOKEN"


def default_state_dir() -> Path:
    """Where the daemon keeps its SQLite store and socket ($VMSHIELD_STATE)."""
    env = os.environ.get("VMSHIELD_STATE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_STATE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".local" / "state") / "vmshield"


StateOpt = Annotated[
    Path | None, typer.Option("--state", help="State folder (default: $VMSHIELD_STATE).")
]
DbOpt = Annotated[
    str | None,
    typer.Option("--db", help="postgresql://USER@HOST:PORT/DB (default: SQLite in --state)."),
]
DaemonOpt = Annotated[
    str | None,
    typer.Option(
        "--daemon",
        envvar=ENV_DAEMON,
        help="unix:PATH or http://HOST:PORT (default: the local daemon's socket).",
    ),
]
TokenOpt = Annotated[
    str | None,
    typer.Option("--token", envvar=ENV_TOKEN, help="Bearer token (needed over TCP)."),
]


def _fail(text: str) -> None:
    typer.echo(f"error: {safe(text)}", err=True)
    raise typer.Exit(2)


def safe(text: str) -> str:
    """A string for the terminal: control characters escaped (guest strings are hostile)."""
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)


# -- the daemon and tokens -----------------------------------------------------------------


def daemon(
    state: StateOpt = None,
    listen: Annotated[
        str | None,
        typer.Option(help="unix:PATH (mode 0600; default STATE/daemon.sock) or tcp:HOST:PORT."),
    ] = None,
    db: DbOpt = None,
    host: Annotated[
        str | None, typer.Option(help="This host's name in a shared store (default: hostname).")
    ] = None,
    retain_days: Annotated[
        float, typer.Option(help="Drop stored events older than this (0: keep all).")
    ] = 30.0,
    retain_events: Annotated[
        int, typer.Option(help="Keep at most this many stored events (0: no limit).")
    ] = 1_000_000,
    connect: Annotated[
        str | None,
        typer.Option(
            help="libvirt URI for libvirt:DOMAIN targets (default: $LIBVIRT_DEFAULT_URI, "
            "else qemu:///system)."
        ),
    ] = None,
) -> None:
    """Run the host daemon: the REST API, the web console and every VM's monitor.
    SIGTERM stops it cleanly (every VM detached)."""
    from vmshield.daemon.app import serve
    from vmshield.store.db import database_url

    if connect:
        os.environ["LIBVIRT_DEFAULT_URI"] = connect  # read by vmshield.hv.libvirt
    state_dir = state or default_state_dir()
    try:
        serve(
            state_dir,
            listen or f"unix:{state_dir / 'daemon.sock'}",
            database_url(db, state_dir),
            host or socket.gethostname(),
            retain_days * 86400.0 if retain_days > 0 else None,
            retain_events if retain_events > 0 else None,
        )
    except VmshieldError as e:
        _fail(str(e))


token_app = typer.Typer(
    no_args_is_help=True, help="Bearer tokens of the daemon's store.", rich_markup_mode="markdown"
)


@token_app.command("create")
def token_create(
    tenant: Annotated[str, typer.Option(help="The tenant the token acts for.")],
    admin: Annotated[bool, typer.Option(help="May see every tenant's VMs.")] = False,
    state: StateOpt = None,
    db: DbOpt = None,
) -> None:
    """Create a bearer token and print it once; the store keeps only its hash."""
    from vmshield.store import Store
    from vmshield.store.db import database_url

    try:
        store = Store.open(database_url(db, state or default_state_dir()))
        try:
            typer.echo(store.create_token(tenant, admin))
        finally:
            store.close()
    except VmshieldError as e:
        _fail(str(e))


# -- clients ------------------------------------------------------------------------------


def client(daemon_url: str | None, token: str | None, timeout: float = 600) -> httpx.Client:
    """An HTTP client for ``unix:PATH`` or ``http(s)://HOST:PORT``."""
    url = daemon_url or f"unix:{default_state_dir() / 'daemon.sock'}"
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if url.startswith("unix:"):
        transport = httpx.HTTPTransport(uds=url[len("unix:") :])
        return httpx.Client(
            transport=transport, base_url="http://vmshield", headers=headers, timeout=timeout
        )
    if url.startswith(("http://", "https://")):
        return httpx.Client(base_url=url, headers=headers, timeout=timeout)
    raise VmshieldError(f"--daemon {url!r}: use unix:PATH or http://HOST:PORT")


def call(c: httpx.Client, method: str, path: str, **kw: Any) -> Any:
    """One request; a problem document becomes an error naming what is wrong."""
    try:
        r = c.request(method, path, **kw)
    except httpx.HTTPError as e:
        raise VmshieldError(f"cannot reach the daemon ({c.base_url}): {e}") from None
    if r.status_code >= 400:
        try:
            doc = r.json()
            text = f"{doc.get('title', r.status_code)}: {doc.get('detail', '')}"
        except ValueError:
            text = f"HTTP {r.status_code}"
        raise VmshieldError(text)
    return r.json() if r.content else None


def vms(
    add: Annotated[str | None, typer.Option(help="Register a VM (lab name or QMP socket).")] = None,
    name: Annotated[str | None, typer.Option(help="Its name (with --add).")] = None,
    remove: Annotated[str | None, typer.Option(help="Unregister the VM with this id.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    daemon_url: DaemonOpt = None,
    token: TokenOpt = None,
) -> None:
    """List the VMs the daemon knows (every host in a shared store); --add, --remove."""
    try:
        with client(daemon_url, token) as c:
            if add:
                body: dict[str, Any] = {"target": add}
                if name:
                    body["name"] = name
                vm = call(c, "POST", "/v1/vms", json=body)
                typer.echo(json.dumps(vm) if as_json else f"registered {vm['id']}")
                return
            if remove:
                call(c, "DELETE", f"/v1/vms/{remove}")
                typer.echo(f"removed {safe(remove)}")
                return
            rows = call(c, "GET", "/v1/vms")["vms"]
    except VmshieldError as e:
        _fail(str(e))
        return
    if as_json:
        typer.echo(json.dumps(rows))
        return
    typer.echo(f"{'ID':16} {'NAME':16} {'HOST':16} {'KERNEL':24} {'ENGINE':7} POINTS")
    for v in rows:
        st = v["status"]
        typer.echo(
            f"{v['id']:16} {safe(v['name'])[:16]:16} {safe(v['host'])[:16]:16} "
            f"{safe(v['kernel'] or '-')[:24]:24} {st.get('engine') or '-':7} "
            f"{st.get('armed_points', 0)}"
        )


def isolate(
    vm: Annotated[str, typer.Argument(help="The VM's id (see `vmshield vms`).")],
    obj: Annotated[str, typer.Option("--object", help="Isolation object, e.g. file.open.")],
    filters: Annotated[
        list[str] | None, typer.Option("--filter", help="KEY=VALUE (repeatable).")
    ] = None,
    action: Annotated[str, typer.Option(help="log, deny, kill, pause or dump.")] = "log",
    daemon_url: DaemonOpt = None,
    token: TokenOpt = None,
) -> None:
    """Send an isolation request to the daemon; prints it with its id and state."""
    flt: dict[str, str] = {}
    for item in filters or []:
        key, sep, val = item.partition("=")
        if not sep or not key:
            _fail(f"bad filter {item!r}: use KEY=VALUE")
        flt[key] = val
    try:
        with client(daemon_url, token) as c:
            row = call(
                c,
                "POST",
                f"/v1/vms/{vm}/isolations",
                json={"object": obj, "filters": flt, "action": action},
            )
    except VmshieldError as e:
        _fail(str(e))
        return
    typer.echo(json.dumps(row))
    if row["state"] == "failed":
        raise typer.Exit(1)


def release(
    request_id: Annotated[str, typer.Argument(help="The isolation request's id.")],
    daemon_url: DaemonOpt = None,
    token: TokenOpt = None,
) -> None:
    """Release an isolation request (the VM's monitor is re-armed without it)."""
    try:
        with client(daemon_url, token) as c:
            call(c, "DELETE", f"/v1/isolations/{request_id}")
    except VmshieldError as e:
        _fail(str(e))
    typer.echo(f"released {safe(request_id)}")


def events(
    vm: Annotated[str | None, typer.Option(help="Only this VM's events.")] = None,
    obj: Annotated[str | None, typer.Option("--object", help="Only this object.")] = None,
    limit: Annotated[int, typer.Option(help="At most this many stored events.")] = 100,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Then stream new ones.")] = False,
    daemon_url: DaemonOpt = None,
    token: TokenOpt = None,
) -> None:
    """Stored events as JSON lines (vmshield.event/1 plus the store id); --follow streams."""
    params: dict[str, Any] = {"limit": limit}
    if vm:
        params["vm"] = vm
    if obj:
        params["object"] = obj
    try:
        with client(daemon_url, token, timeout=600) as c:
            page = call(c, "GET", "/v1/events", params=params)
            for ev in page["events"]:
                typer.echo(json.dumps(ev))
            if not follow:
                return
            last = page["next_cursor"]
            params.pop("limit")
            for ev in _stream(c, params, last):
                typer.echo(json.dumps(ev))
                sys.stdout.flush()
    except VmshieldError as e:
        _fail(str(e))
    except KeyboardInterrupt:
        pass


def _stream(c: httpx.Client, params: dict[str, Any], last: str | None) -> Iterator[Any]:
    """SSE with resume: reconnects after the last event seen (Last-Event-ID)."""
    while True:
        headers = {"Last-Event-ID": last} if last else {}
        try:
            with c.stream(
                "GET", "/v1/events/stream", params=params, headers=headers, timeout=None
            ) as r:
                if r.status_code >= 400:
                    r.read()
                    call_text = r.text
                    raise VmshieldError(f"stream refused ({r.status_code}): {call_text}")
                data: list[str] = []
                for line in r.iter_lines():
                    if line.startswith("id:"):
                        last = line[3:].strip()
                    elif line.startswith("data:"):
                        data.append(line[5:].strip())
                    elif not line and data:
                        yield json.loads("\n".join(data))
                        data = []
        except httpx.TransportError:
            import time

            time.sleep(1)  # the daemon restarts: resume after the last event seen


def register(app: typer.Typer) -> None:
    """Add these commands to the main `vmshield` command."""
    app.command("daemon")(daemon)
    app.add_typer(token_app, name="token")
    app.command("vms")(vms)
    app.command("isolate")(isolate)
    app.command("release")(release)
    app.command("events")(events)
