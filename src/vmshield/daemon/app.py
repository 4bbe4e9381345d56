"""The daemon process: store + registry + routes under uvicorn, started and stopped cleanly.

Why the extra pieces around the routes: errors must be RFC 9457 problem documents
naming what is wrong (not FastAPI's default shapes), bodies are bounded before they
are read, SSE streams must end when the daemon is asked to stop (or uvicorn would wait
for them), and SIGTERM must leave every VM detached.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import stat
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, MutableMapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from vmshield.daemon.api import router
from vmshield.daemon.registry import Problem, Registry
from vmshield.errors import VmshieldError
from vmshield.store import Store

MAX_BODY = 64 * 1024
RETENTION_INTERVAL = 60.0
WATCH_INTERVAL = 5.0
STATIC = Path(__file__).resolve().parent.parent / "web" / "static"

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class Hub:
    """Wakes the SSE streams when an event was stored (called from monitor threads)."""

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self.waiters: set[asyncio.Event] = set()
        self.closing = False
        self._lock = threading.Lock()

    def listen(self) -> asyncio.Event:
        ev = asyncio.Event()
        with self._lock:
            self.waiters.add(ev)
        return ev

    def forget(self, ev: asyncio.Event) -> None:
        with self._lock:
            self.waiters.discard(ev)

    def _wake_all(self) -> None:
        with self._lock:
            waiters = list(self.waiters)
        for ev in waiters:
            ev.set()

    def notify(self) -> None:
        loop = self.loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # loop closed meanwhile
                loop.call_soon_threadsafe(self._wake_all)

    def close(self) -> None:
        self.closing = True
        self.notify()


def problem(status: int, title: str, detail: str, instance: str | None = None) -> JSONResponse:
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail}
    if instance is not None:
        body["instance"] = instance
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(body, status, media_type="application/problem+json", headers=headers)


class BodyLimit:
    """Refuses request bodies over ``limit`` bytes with 413, before the route reads them
    (by Content-Length, and by counting when the body is chunked)."""

    def __init__(self, app: ASGIApp, limit: int = MAX_BODY) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_big = problem(
            413, "Content Too Large", f"request body over {self.limit} bytes", scope["path"]
        )
        for k, v in scope.get("headers", []):
            if k == b"content-length" and (not v.isdigit() or int(v) > self.limit):
                await too_big(scope, receive, send)
                return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    raise _TooBig
            return msg

        try:
            await self.app(scope, counted, send)
        except _TooBig:
            await too_big(scope, receive, send)


class _TooBig(Exception):
    pass


@dataclass
class DaemonConfig:
    state_dir: Path
    host: str
    local_trust: bool  # Unix socket without a token = local admin
    retention_age: float | None = 30 * 86400.0
    retention_count: int | None = 1_000_000


def create_app(store: Store, registry: Registry, hub: Hub, cfg: DaemonConfig) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        hub.loop = asyncio.get_running_loop()
        await run_in_threadpool(registry.start)  # re-arm every stored request of this host
        tasks = [
            asyncio.create_task(_retention(store, cfg)),
            asyncio.create_task(_watch(registry)),
        ]
        try:
            yield
        finally:
            hub.close()
            for task in tasks:
                task.cancel()
            await run_in_threadpool(registry.close)

    app = FastAPI(
        title="vmshield",
        version="1",
        summary="Isolation requests and events of the VMs on this host.",
        lifespan=lifespan,
    )
    app.state.store, app.state.registry, app.state.hub = store, registry, hub
    app.state.local_trust = cfg.local_trust

    @app.exception_handler(Problem)
    async def _problem(request: Request, e: Problem) -> JSONResponse:
        return problem(e.status, e.title, e.detail, request.url.path)

    @app.exception_handler(VmshieldError)
    async def _vmshield(request: Request, e: VmshieldError) -> JSONResponse:
        return problem(422, "Unprocessable Content", str(e), request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        parts = []
        for err in e.errors():
            where = ".".join(str(p) for p in err.get("loc", ()))
            parts.append(f"{where}: {err.get('msg', 'invalid')}")
        return problem(422, "Unprocessable Content", "; ".join(parts), request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return problem(e.status_code, _title(e.status_code), str(e.detail), request.url.path)

    app.include_router(router)
    app.mount("/", StaticFiles(directory=STATIC, html=True), name="console")
    app.add_middleware(BodyLimit)
    return app


def _title(status: int) -> str:
    from http import HTTPStatus

    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


async def _retention(store: Store, cfg: DaemonConfig) -> None:
    while True:
        with contextlib.suppress(Exception):  # a failed prune is retried next round
            await run_in_threadpool(store.prune, cfg.retention_age, cfg.retention_count)
        await asyncio.sleep(RETENTION_INTERVAL)


async def _watch(registry: Registry) -> None:
    while True:
        await asyncio.sleep(WATCH_INTERVAL)
        with contextlib.suppress(Exception):  # a failed check is retried next round
            await run_in_threadpool(registry.watch)


class _Server(uvicorn.Server):
    """uvicorn's server that also ends the SSE streams when asked to stop, and exits
    with status 0 after a clean SIGTERM shutdown (uvicorn re-raises the signal)."""

    hub: Hub

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.hub.close()
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        old = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, handler in old.items():
                signal.signal(s, handler)


def listen_socket(listen: str) -> tuple[socket.socket, bool]:
    """``unix:PATH`` (mode 0600) or ``tcp:HOST:PORT`` -> a bound socket, and whether it is
    a Unix socket."""
    kind, _, where = listen.partition(":")
    if kind == "unix" and where:
        path = Path(where)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() or path.is_symlink():
            if not stat.S_ISSOCK(path.lstat().st_mode):
                raise VmshieldError(f"--listen {listen}: {path} exists and is not a socket")
            path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            sock.bind(str(path))
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        return sock, True
    if kind == "tcp":
        host, _, port = where.rpartition(":")
        if not host or not port.isdigit():
            raise VmshieldError(f"--listen {listen}: use tcp:HOST:PORT")
        host = host.strip("[]")
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(fam, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, int(port)))
        return sock, False
    raise VmshieldError(f"--listen {listen!r}: use unix:PATH or tcp:HOST:PORT")


def serve(
    state_dir: Path,
    listen: str,
    db_url: str,
    host: str,
    retention_age: float | None = 30 * 86400.0,
    retention_count: int | None = 1_000_000,
) -> None:
    """Run the daemon until SIGTERM/SIGINT; every VM is detached before it returns."""
    state_dir.mkdir(parents=True, exist_ok=True)
    sock, is_unix = listen_socket(listen)
    store = Store.open(db_url)
    hub = Hub()
    registry = Registry(store, host, state_dir, notify=hub.notify)
    cfg = DaemonConfig(state_dir, host, is_unix, retention_age, retention_count)
    app = create_app(store, registry, hub, cfg)
    config = uvicorn.Config(
        app, log_level="warning", timeout_graceful_shutdown=5, lifespan="on", access_log=False
    )
    server = _Server(config)
    server.hub = hub
    try:
        server.run(sockets=[sock])
    finally:
        store.close()
        if is_unix:
            with contextlib.suppress(OSError):
                Path(listen.partition(":")[2]).unlink()
