"""The store's operations, one short transaction each.

Why Core and not the ORM: every operation is one or two statements, called from the
monitor threads (events) and the API's worker threads alike; plain statements on a
pooled engine keep that simple and equally correct on SQLite and PostgreSQL.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy.engine import Connection, Engine

from vmshield.errors import VmshieldError
from vmshield.store.schema import counters, events, isolations, tenants, tokens, vms

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
_MIGRATION_LOCK = 0x766D7368  # "vmsh": a PostgreSQL advisory lock key


class StoreError(VmshieldError):
    """The database cannot be opened or used as asked."""


def hash_token(token: str) -> str:
    """What is stored of a bearer token: its SHA-256, never the token itself."""
    return hashlib.sha256(token.encode()).hexdigest()


def database_url(db: str | None, state_dir: Path) -> str:
    """``--db`` as SQLAlchemy wants it: None -> the SQLite file in the state folder;
    ``postgresql://`` -> the psycopg 3 driver."""
    if db is None:
        return f"sqlite:///{state_dir / 'vmshield.db'}"
    for prefix in ("postgresql://", "postgres://"):
        if db.startswith(prefix):
            return "postgresql+psycopg://" + db[len(prefix) :]
    if db.startswith(("sqlite:///", "postgresql+psycopg://")):
        return db
    raise StoreError(f"--db {db!r}: use postgresql://USER@HOST:PORT/DB or sqlite:///PATH")


@dataclass(frozen=True)
class Principal:
    """Who a request comes from: a tenant, and whether its token is an admin token
    (admins see every tenant's VMs)."""

    tenant: str
    admin: bool


@dataclass(frozen=True)
class StoredEvent:
    id: int
    vm: str
    object: str
    json: str


def _now() -> float:
    return time.time()


class Store:
    """One database, migrated to the newest schema when opened."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.dialect = engine.dialect.name

    @classmethod
    def open(cls, url: str) -> Store:
        """Connect and run every migration not yet applied (Alembic ``upgrade head``)."""
        if url.startswith("sqlite:///"):
            Path(url[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
            engine = sa.create_engine(url, connect_args={"timeout": 30})

            @sa.event.listens_for(engine, "connect")
            def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
                cur = dbapi_conn.cursor()
                cur.execute("PRAGMA journal_mode=WAL")  # readers do not block the writer
                cur.execute("PRAGMA synchronous=NORMAL")
                cur.execute("PRAGMA foreign_keys=ON")
                cur.close()

        else:
            engine = sa.create_engine(url, pool_pre_ping=True, pool_size=8)
        store = cls(engine)
        try:
            store.migrate()
        except sa.exc.OperationalError as e:
            engine.dispose()
            raise StoreError(f"cannot open the store ({engine.url!r}): {e.orig}") from None
        return store

    def migrate(self) -> None:
        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        with self.engine.begin() as conn:
            if self.dialect == "postgresql":  # two daemons starting at once: one migrates
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _MIGRATION_LOCK})
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")

    def close(self) -> None:
        self.engine.dispose()

    # -- tenants and tokens -------------------------------------------------------------

    def create_token(self, tenant: str, admin: bool = False) -> str:
        """A new random bearer token for ``tenant`` (made if new); only its hash is kept."""
        if not tenant or len(tenant) > 64 or not tenant.replace("-", "a").isalnum():
            raise StoreError(f"tenant {tenant!r}: use letters, digits and '-' (up to 64)")
        token = "vms_" + secrets.token_urlsafe(32)
        with self.engine.begin() as c:
            if c.execute(sa.select(tenants.c.name).where(tenants.c.name == tenant)).first() is None:
                c.execute(sa.insert(tenants).values(name=tenant, created=_now()))
            c.execute(
                sa.insert(tokens).values(
                    hash=hash_token(token), tenant=tenant, admin=admin, created=_now()
                )
            )
        return token

    def ensure_tenant(self, tenant: str) -> None:
        with self.engine.begin() as c:
            if c.execute(sa.select(tenants.c.name).where(tenants.c.name == tenant)).first() is None:
                c.execute(sa.insert(tenants).values(name=tenant, created=_now()))

    def principal(self, token: str) -> Principal | None:
        with self.engine.connect() as c:
            row = c.execute(
                sa.select(tokens.c.tenant, tokens.c.admin).where(tokens.c.hash == hash_token(token))
            ).first()
        return Principal(row.tenant, bool(row.admin)) if row else None

    # -- VMs ----------------------------------------------------------------------------

    def add_vm(self, vm_id: str, name: str, target: str, host: str, tenant: str) -> None:
        with self.engine.begin() as c:
            c.execute(
                sa.insert(vms).values(
                    id=vm_id,
                    name=name,
                    target=target,
                    host=host,
                    tenant=tenant,
                    created=_now(),
                    kernel=None,
                    status="{}",
                )
            )

    def vms(
        self, principal: Principal | None = None, host: str | None = None
    ) -> list[dict[str, Any]]:
        q = sa.select(vms).order_by(vms.c.created, vms.c.id)
        if principal is not None and not principal.admin:
            q = q.where(vms.c.tenant == principal.tenant)
        if host is not None:
            q = q.where(vms.c.host == host)
        with self.engine.connect() as c:
            return [self._vm_row(r._mapping) for r in c.execute(q)]

    def _first(
        self, q: sa.Select[Any], row: Callable[[Any], dict[str, Any]]
    ) -> dict[str, Any] | None:
        """The first row of ``q`` as ``row`` makes it, or None."""
        with self.engine.connect() as c:
            r = c.execute(q).first()
        return row(r._mapping) if r else None

    def vm(self, vm_id: str) -> dict[str, Any] | None:
        return self._first(sa.select(vms).where(vms.c.id == vm_id), self._vm_row)

    @staticmethod
    def _vm_row(m: Any) -> dict[str, Any]:
        d = dict(m)
        d["status"] = json.loads(d["status"] or "{}")
        return d

    def vm_by_target(self, host: str, target: str) -> dict[str, Any] | None:
        q = sa.select(vms).where(vms.c.host == host, vms.c.target == target)
        return self._first(q, self._vm_row)

    def set_vm_status(self, vm_id: str, kernel: str | None, status: dict[str, Any]) -> None:
        with self.engine.begin() as c:
            c.execute(
                sa.update(vms)
                .where(vms.c.id == vm_id)
                .values(kernel=kernel, status=json.dumps(status))
            )

    def delete_vm(self, vm_id: str) -> None:
        """The VM and its requests; its stored events stay (history) and remain visible
        to its tenant only."""
        with self.engine.begin() as c:
            c.execute(sa.delete(isolations).where(isolations.c.vm == vm_id))
            c.execute(sa.delete(vms).where(vms.c.id == vm_id))

    # -- isolation requests -------------------------------------------------------------

    def add_isolation(
        self, req_id: str, vm_id: str, obj: str, filters: dict[str, str], action: str
    ) -> None:
        with self.engine.begin() as c:
            c.execute(
                sa.insert(isolations).values(
                    id=req_id,
                    vm=vm_id,
                    object=obj,
                    filters=json.dumps(filters),
                    action=action,
                    state="pending",
                    reason=None,
                    created=_now(),
                )
            )

    def isolations(self, vm_id: str) -> list[dict[str, Any]]:
        q = (
            sa.select(isolations)
            .where(isolations.c.vm == vm_id)
            .order_by(isolations.c.created, isolations.c.id)
        )
        with self.engine.connect() as c:
            return [self._iso_row(r._mapping) for r in c.execute(q)]

    def count_isolations(self, vm_id: str) -> int:
        with self.engine.connect() as c:
            return int(
                c.execute(
                    sa.select(sa.func.count())
                    .select_from(isolations)
                    .where(isolations.c.vm == vm_id)
                ).scalar_one()
            )

    def isolation(self, req_id: str) -> dict[str, Any] | None:
        return self._first(sa.select(isolations).where(isolations.c.id == req_id), self._iso_row)

    @staticmethod
    def _iso_row(m: Any) -> dict[str, Any]:
        d = dict(m)
        d["filters"] = json.loads(d["filters"])
        return d

    def set_isolation_state(self, req_id: str, state: str, reason: str | None = None) -> None:
        with self.engine.begin() as c:
            c.execute(
                sa.update(isolations)
                .where(isolations.c.id == req_id)
                .values(state=state, reason=reason)
            )

    def delete_isolation(self, req_id: str) -> None:
        with self.engine.begin() as c:
            c.execute(sa.delete(isolations).where(isolations.c.id == req_id))

    # -- events -------------------------------------------------------------------------

    def add_event(
        self, vm_id: str, tenant: str, request: str, obj: str, when: float, text: str
    ) -> tuple[int, float]:
        """Store one event (committed when this returns); its id and the store time."""
        stored = _now()
        with self.engine.begin() as c:
            res = c.execute(
                sa.insert(events).values(
                    vm=vm_id,
                    tenant=tenant,
                    request=request,
                    object=obj,
                    time=when,
                    json=text,
                    stored_at=stored,
                )
            )
            pk = res.inserted_primary_key
        assert pk is not None
        return int(pk[0]), stored

    def add_events(self, batch: Sequence[tuple[str, str, str, str, float, str, float]]) -> float:
        """Store a batch of events ``(vm, tenant, request, object, time, json,
        received_at)`` in one transaction (committed when this returns); returns the
        store time."""
        stored = _now()
        rows = [
            {"vm": vm, "tenant": tenant, "request": req, "object": obj, "time": when,
             "json": text, "stored_at": stored, "received_at": got}
            for vm, tenant, req, obj, when, text, got in batch
        ]  # fmt: skip
        with self.engine.begin() as c:
            c.execute(sa.insert(events), rows)
        return stored

    def events(
        self,
        principal: Principal,
        *,
        vm: str | None = None,
        obj: str | None = None,
        since: float | None = None,
        after: int = 0,
        limit: int = 100,
        vm_ids: Sequence[str] | None = None,
    ) -> list[StoredEvent]:
        """Events with id > ``after``, oldest first (newest last), at most ``limit``."""
        q = sa.select(events.c.id, events.c.vm, events.c.object, events.c.json).where(
            events.c.id > after
        )
        if not principal.admin:
            q = q.where(events.c.tenant == principal.tenant)
        if vm is not None:
            q = q.where(events.c.vm == vm)
        if vm_ids is not None:
            q = q.where(events.c.vm.in_(list(vm_ids)))
        if obj is not None:
            q = q.where(events.c.object == obj)
        if since is not None:
            q = q.where(events.c.time >= since)
        q = q.order_by(events.c.id).limit(limit)
        with self.engine.connect() as c:
            return [StoredEvent(r.id, r.vm, r.object, r.json) for r in c.execute(q)]

    def last_event_id(self) -> int:
        with self.engine.connect() as c:
            return int(
                c.execute(sa.select(sa.func.coalesce(sa.func.max(events.c.id), 0))).scalar_one()
            )

    def prune(self, max_age: float | None, max_count: int | None) -> int:
        """Retention: drop events stored more than ``max_age`` seconds ago and all but the
        newest ``max_count``; returns how many were removed."""
        removed = 0
        with self.engine.begin() as c:
            if max_age is not None:
                removed += c.execute(
                    sa.delete(events).where(events.c.stored_at < _now() - max_age)
                ).rowcount
            if max_count is not None:
                cut = c.execute(
                    sa.select(events.c.id).order_by(events.c.id.desc()).offset(max_count).limit(1)
                ).scalar()
                if cut is not None:
                    removed += c.execute(sa.delete(events).where(events.c.id <= cut)).rowcount
        return removed

    # -- counters -----------------------------------------------------------------------

    def count(self, vm_id: str, name: str, n: int) -> None:
        """Add ``n`` to a named counter of a VM (drops of every kind)."""
        with self.engine.begin() as c:
            upd = c.execute(
                sa.update(counters)
                .where(counters.c.vm == vm_id, counters.c.name == name)
                .values(value=counters.c.value + n)
            )
            if upd.rowcount == 0:
                c.execute(sa.insert(counters).values(vm=vm_id, name=name, value=n))

    def counters(self, vm_ids: Iterable[str] | None = None) -> list[tuple[str, str, int]]:
        q = sa.select(counters.c.vm, counters.c.name, counters.c.value)
        if vm_ids is not None:
            q = q.where(counters.c.vm.in_(list(vm_ids)))
        with self.engine.connect() as c:
            return [(r.vm, r.name, int(r.value)) for r in c.execute(q)]

    def raw(self) -> Connection:
        """A connection for tests and the benchmark (the caller closes it)."""
        return self.engine.connect()
