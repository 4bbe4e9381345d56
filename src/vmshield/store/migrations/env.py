"""Alembic environment: migrations run on the connection the store hands over.

Why no URL here: the store opens the database (SQLite file or PostgreSQL) itself and
runs ``upgrade head`` inside its own transaction, holding a lock on PostgreSQL so two
daemons starting at once do not both migrate.
"""

from __future__ import annotations

from alembic import context

from vmshield.store.schema import metadata

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
