"""Database URLs and engines: SQLite by default, any SQLAlchemy URL (PostgreSQL through psycopg 3).

SQLite connections get WAL journaling (readers never block the writer), foreign keys ON, a busy
timeout, ``synchronous=FULL`` (a committed verdict survives a power cut) and ``BEGIN IMMEDIATE`` for
write transactions (a read-then-write transaction never fails half way on a lock it cannot upgrade).
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from functools import partial
from pathlib import Path

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.pool import StaticPool

DB_URL_ENV = "AGENT_DB_URL"
SQLITE_BUSY_TIMEOUT_MS = 10_000
WRITE_OPTION = "storage_write"  # execution option: this connection's transactions write
_json_serializer = partial(json.dumps, allow_nan=False)  # NaN/inf are not JSON: refuse them instead of storing 'NaN'


def default_db_path() -> Path:
    """``$XDG_DATA_HOME/edge-inspection-agent/results.db`` (``~/.local/share/...`` when unset)."""
    data_home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data_home) / "edge-inspection-agent" / "results.db"


def default_db_url() -> str:
    """The results database: ``$AGENT_DB_URL`` if set, else SQLite at :func:`default_db_path`."""
    return os.environ.get(DB_URL_ENV) or f"sqlite:///{default_db_path()}"


def normalise_url(url: str | URL) -> URL:
    """Parse a database URL; plain ``postgresql://``/``postgres://`` use the psycopg 3 driver.

    Raises ValueError naming the URL when it cannot be parsed.
    """
    if isinstance(url, str) and url.startswith("postgres://"):
        url = "postgresql://" + url[len("postgres://") :]
    try:
        parsed = make_url(url)
    except Exception as e:  # sqlalchemy.exc.ArgumentError and friends
        raise ValueError(f"database URL {redact(url)!r} is not a valid SQLAlchemy URL: {e}") from None
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def redact(url: str | URL) -> str:
    """The URL with its password hidden, for messages and logs."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<unparseable URL>"


def is_sqlite(url: str | URL) -> bool:
    return normalise_url(url).get_backend_name() == "sqlite"


def sqlite_path(url: str | URL) -> Path | None:
    """The file of a SQLite URL; None for other databases and in-memory SQLite."""
    u = normalise_url(url)
    if u.get_backend_name() != "sqlite" or u.database in (None, "", ":memory:"):
        return None
    return Path(u.database)


def make_engine(url: str | URL, *, create_dir: bool = True, echo: bool = False) -> Engine:
    """An engine for ``url``, configured as the module docstring says for SQLite.

    ``create_dir``: create the parent directory of a SQLite file.
    """
    u = normalise_url(url)
    if u.get_backend_name() != "sqlite":
        return create_engine(u, echo=echo, pool_pre_ping=True, json_serializer=_json_serializer)

    path = sqlite_path(u)
    if path is None:  # in-memory: one connection shared by all threads, or each would see its own database
        engine = create_engine(u, echo=echo, poolclass=StaticPool, connect_args={"check_same_thread": False}, json_serializer=_json_serializer)
    else:
        if create_dir:
            path.parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(u, echo=echo, connect_args={"check_same_thread": False}, json_serializer=_json_serializer)
    _configure_sqlite(engine, wal=path is not None)
    return engine


def _switch_to_wal(cursor) -> str:  # noqa: ANN001
    """Put the database file in WAL mode; returns the journal mode it is in.

    WAL is a property of the file, so a file already in WAL is left alone. The switch needs an exclusive
    lock and SQLite answers "database is locked" at once instead of running the busy handler, so when
    several agents open a new file together the switch is retried within the busy timeout.
    """
    mode = cursor.execute("PRAGMA journal_mode").fetchone()[0]
    if str(mode).lower() == "wal":
        return mode
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            return cursor.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def _configure_sqlite(engine: Engine, *, wal: bool) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record):  # noqa: ANN001
        dbapi_connection.isolation_level = None  # pysqlite's own BEGIN handling off: we emit BEGIN below
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
            cursor.execute("PRAGMA foreign_keys = ON")
            if wal:
                mode = _switch_to_wal(cursor)
                if str(mode).lower() != "wal":
                    raise RuntimeError(f"SQLite database could not switch to WAL journal mode (got {mode!r})")
            cursor.execute("PRAGMA synchronous = FULL")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection):  # noqa: ANN001
        write = connection.get_execution_options().get(WRITE_OPTION, False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")
