"""Alembic revisions, oldest first (0001_initial, ...). Alembic skips this file."""
