"""Alembic migration environment of the store (run by :meth:`vmshield.store.Store.open`)."""
