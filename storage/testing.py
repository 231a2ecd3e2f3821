"""Throw-away PostgreSQL databases for tests (each test run gets its own, so parallel runs never collide).

``AGENT_TEST_PG_URL`` names the server's maintenance database (default
``postgresql+psycopg://postgres@127.0.0.1:5432/test``).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL

from storage.db import normalise_url

TEST_PG_URL_ENV = "AGENT_TEST_PG_URL"
DEFAULT_TEST_PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def pg_server_url() -> URL:
    return normalise_url(os.environ.get(TEST_PG_URL_ENV) or DEFAULT_TEST_PG_URL)


def postgres_unavailable_reason(server: URL | None = None) -> str | None:
    """None when the server answers, else why not (for pytest.skip)."""
    server = server or pg_server_url()
    engine = create_engine(server, connect_args={"connect_timeout": 3})
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        return None
    except Exception as e:  # driver missing, refused, auth...
        return f"PostgreSQL at {server.render_as_string(hide_password=True)} is not reachable: {type(e).__name__}: {e}"
    finally:
        engine.dispose()


@contextmanager
def temporary_database(server: URL | None = None, prefix: str = "agent_test") -> Iterator[URL]:
    """Create a uniquely named, empty database on the server, yield its URL, drop it afterwards."""
    server = server or pg_server_url()
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = create_engine(server, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        try:
            yield server.set(database=name)
        finally:
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()
