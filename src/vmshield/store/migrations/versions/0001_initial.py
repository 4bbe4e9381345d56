"""The first schema: tenants, tokens, vms, isolations, events, counters.

Revision ID: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "tenants",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("created", sa.Float, nullable=False),
    )
    op.create_table(
        "tokens",
        sa.Column("hash", sa.String(64), primary_key=True),
        sa.Column("tenant", sa.String(64), sa.ForeignKey("tenants.name"), nullable=False),
        sa.Column("admin", sa.Boolean, nullable=False),
        sa.Column("created", sa.Float, nullable=False),
    )
    op.create_table(
        "vms",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("target", sa.String(1024), nullable=False),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("tenant", sa.String(64), sa.ForeignKey("tenants.name"), nullable=False),
        sa.Column("created", sa.Float, nullable=False),
        sa.Column("kernel", sa.String(256), nullable=True),
        sa.Column("status", sa.Text, nullable=False),
    )
    op.create_index("ix_vms_host", "vms", ["host"])
    op.create_table(
        "isolations",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("vm", sa.String(32), sa.ForeignKey("vms.id"), nullable=False),
        sa.Column("object", sa.String(512), nullable=False),
        sa.Column("filters", sa.Text, nullable=False),
        sa.Column("action", sa.String(16), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text, nullable=True),
        sa.Column("created", sa.Float, nullable=False),
    )
    op.create_index("ix_isolations_vm", "isolations", ["vm"])
    op.create_table(
        "events",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            primary_key=True,
            autoincrement=True,
        ),
        sa.Column("vm", sa.String(32), nullable=False),
        sa.Column("tenant", sa.String(64), nullable=False),
        sa.Column("request", sa.String(64), nullable=False),
        sa.Column("object", sa.String(512), nullable=False),
        sa.Column("time", sa.Float, nullable=False),
        sa.Column("json", sa.Text, nullable=False),
        sa.Column("stored_at", sa.Float, nullable=False),
    )
    op.create_index("ix_events_tenant_id", "events", ["tenant", "id"])
    op.create_index("ix_events_stored_at", "events", ["stored_at"])
    op.create_table(
        "counters",
        sa.Column("vm", sa.String(32), primary_key=True),
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("value", sa.BigInteger, nullable=False),
    )


def downgrade() -> None:
    for table in ("counters", "events", "isolations", "vms", "tokens", "tenants"):
        op.drop_table(table)
