"""Table definitions (SQLAlchemy Core), the one description queries are written against.

The migrations under ``migrations/versions`` create exactly these tables; a unit test
compares the two so they cannot drift.
"""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

# A sequence for events that is a plain INTEGER PRIMARY KEY on SQLite (its rowid, which
# autoincrements) and a BIGINT identity on PostgreSQL.
EventId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

tenants = sa.Table(
    "tenants",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("created", sa.Float, nullable=False),
)

tokens = sa.Table(
    "tokens",
    metadata,
    sa.Column("hash", sa.String(64), primary_key=True),  # sha256 hex of the bearer token
    sa.Column("tenant", sa.String(64), sa.ForeignKey("tenants.name"), nullable=False),
    sa.Column("admin", sa.Boolean, nullable=False, default=False),
    sa.Column("created", sa.Float, nullable=False),
)

vms = sa.Table(
    "vms",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("name", sa.String(128), nullable=False),
    sa.Column("target", sa.String(1024), nullable=False),
    sa.Column("host", sa.String(255), nullable=False, index=True),
    sa.Column("tenant", sa.String(64), sa.ForeignKey("tenants.name"), nullable=False),
    sa.Column("created", sa.Float, nullable=False),
    sa.Column("kernel", sa.String(256), nullable=True),
    sa.Column("status", sa.Text, nullable=False, default="{}"),  # JSON, written by its host
)

isolations = sa.Table(
    "isolations",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("vm", sa.String(32), sa.ForeignKey("vms.id"), nullable=False, index=True),
    sa.Column("object", sa.String(512), nullable=False),
    sa.Column("filters", sa.Text, nullable=False),  # JSON object of strings
    sa.Column("action", sa.String(16), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),  # pending | armed | failed
    sa.Column("reason", sa.Text, nullable=True),
    sa.Column("created", sa.Float, nullable=False),
)

events = sa.Table(
    "events",
    metadata,
    sa.Column("id", EventId, primary_key=True, autoincrement=True),
    sa.Column("vm", sa.String(32), nullable=False),
    sa.Column("tenant", sa.String(64), nullable=False),
    sa.Column("request", sa.String(64), nullable=False),
    sa.Column("object", sa.String(512), nullable=False),
    sa.Column("time", sa.Float, nullable=False),
    sa.Column("json", sa.Text, nullable=False),
    sa.Column("stored_at", sa.Float, nullable=False),
    sa.Column("received_at", sa.Float, nullable=True),  # from the engine (migration 0002)
    sa.Index("ix_events_tenant_id", "tenant", "id"),
    sa.Index("ix_events_stored_at", "stored_at"),
)

counters = sa.Table(
    "counters",
    metadata,
    sa.Column("vm", sa.String(32), primary_key=True),
    sa.Column("name", sa.String(64), primary_key=True),  # e.g. drops.ring, drops.store
    sa.Column("value", sa.BigInteger, nullable=False),
)
