"""The daemon's persistent store: tenants and tokens, VMs, isolation requests, events.

Why a store at all: requests must survive a daemon restart (they are re-armed), events
must be durable before any client sees them, and several daemons (one per host) can
share one PostgreSQL so every host's VMs show in one listing. SQLite in the state
folder is the default; the schema is managed by Alembic migrations run at open.
"""

from vmshield.store.db import Principal, Store, StoredEvent, hash_token

__all__ = ["Principal", "Store", "StoredEvent", "hash_token"]
