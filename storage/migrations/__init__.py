"""Alembic migrations of the results database (run them with :func:`storage.migrate.upgrade_to_head`)."""
