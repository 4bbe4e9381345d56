"""events.received_at: when the daemon got the event from the engine.

Why: ``time`` is the event's own time (the security space converts the guest's clock,
which drifts under TCG), so the latency the daemon itself adds (engine -> store ->
clients) needs a host timestamp taken at delivery.

Revision ID: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("events") as batch:
        batch.add_column(sa.Column("received_at", sa.Float, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("events") as batch:
        batch.drop_column("received_at")
