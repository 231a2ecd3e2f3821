"""Schema migrations, run programmatically (no alembic.ini): the only way the schema is created.

New revision during development (needs a database at head)::

    from alembic import command
    from storage.migrate import alembic_config
    command.revision(alembic_config("sqlite:////tmp/dev.db"), message="add x", autogenerate=True)

then read the generated file in storage/migrations/versions/ and fix what autogenerate got wrong.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, text
from sqlalchemy.engine import URL

from storage.db import WRITE_OPTION, make_engine, normalise_url, redact

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
MIGRATION_LOCK_KEY = 0x65_64_67_65_5F_61_67_74  # PostgreSQL advisory lock held while migrating ("edge_agt")


class SchemaError(RuntimeError):
    """The database's schema is not the one this code expects (not migrated, or newer than this code)."""


def alembic_config(url: str | URL | None = None) -> Config:
    """An Alembic Config pointing at storage/migrations (and at ``url`` when given)."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if url is not None:
        # ConfigParser interpolation: '%' in a URL (escaped password) must be doubled
        cfg.set_main_option("sqlalchemy.url", normalise_url(url).render_as_string(hide_password=False).replace("%", "%%"))
    return cfg


def head_revision() -> str:
    """The newest revision in storage/migrations/versions/."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:
        raise SchemaError(f"no migrations found in {MIGRATIONS_DIR}")
    return head


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at; None for a database that was never migrated."""
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade_engine(engine: Engine, revision: str = "head") -> None:
    """Migrate the database behind ``engine`` to ``revision`` (default: head) in one transaction."""
    cfg = alembic_config()
    with engine.connect() as conn:
        conn.execution_options(**{WRITE_OPTION: True})  # SQLite: BEGIN IMMEDIATE, one migrator at a time
        with conn.begin():
            if conn.dialect.name == "postgresql":  # agents starting together migrate one after the other
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)


def upgrade_to_head(url: str | URL) -> str:
    """Create or migrate the database at ``url`` to the newest schema; returns the head revision."""
    engine = make_engine(url)
    try:
        upgrade_engine(engine)
    finally:
        engine.dispose()
    return head_revision()


def check_schema(engine: Engine) -> None:
    """Raise SchemaError unless the database is at the head revision."""
    current, head = current_revision(engine), head_revision()
    if current != head:
        where = redact(engine.url)
        if current is None:
            raise SchemaError(f"results database {where} has no schema (never migrated): run `agent results migrate --db URL`")
        raise SchemaError(
            f"results database {where} is at schema revision {current!r}, this agent expects {head!r}: run `agent results migrate --db URL`"
            " (a database newer than the code needs a newer agent)"
        )
