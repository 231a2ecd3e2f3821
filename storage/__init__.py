"""Persistence of everything the agent produces: parts, views, verdicts, defects and errors.

``ResultStore(url)`` is the API (storage/store.py); the schema lives in storage/models.py and is
created only by the Alembic migrations in storage/migrations/ (``upgrade_to_head(url)``).
``agent results ...`` (storage/cli.py) lists, shows and exports results. The database URL defaults to
``$AGENT_DB_URL``, else SQLite at ``$XDG_DATA_HOME/edge-inspection-agent/results.db``.
"""

from storage.db import DB_URL_ENV, default_db_url, make_engine
from storage.migrate import SchemaError, check_schema, head_revision, upgrade_to_head
from storage.store import (
    DefectRecord,
    ErrorRecord,
    PartFilter,
    PartRecord,
    PartSummary,
    ResultStore,
    UnknownPartError,
    VerdictRecord,
    ViewRecord,
)

__all__ = [
    "DB_URL_ENV",
    "DefectRecord",
    "ErrorRecord",
    "PartFilter",
    "PartRecord",
    "PartSummary",
    "ResultStore",
    "SchemaError",
    "UnknownPartError",
    "VerdictRecord",
    "ViewRecord",
    "check_schema",
    "default_db_url",
    "head_revision",
    "make_engine",
    "upgrade_to_head",
]
