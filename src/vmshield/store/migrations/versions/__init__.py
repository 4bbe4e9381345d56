"""Migration scripts, oldest first (Alembic revisions)."""
