"""The framework's database surface: its engine settings and its tables, for migrations.

``create_database_engine`` builds the async engine the framework's db tasks
use. ``include_framework_tables(metadata)`` copies the framework's own tables
(the outbox, deduplication leases, run-once completions, dead letters and the
limits' tables) onto your metadata, so that your Alembic env creates them and
``alembic revision --autogenerate`` never proposes to drop them; pass
``include_name`` to ``context.configure`` too, so that autogenerate leaves
the tables of a database result backend alone (Celery's, in the same
database). ``framework_metadata`` holds the framework's tables alone.
"""

from sqlalchemy import MetaData

from .internals.exceptions import MissingTablesError
from .internals.schema import FRAMEWORK_TABLES, include_framework_tables, include_name
from .internals.session import DatabaseConfig, check_tables
from .internals.session import create_engine as create_database_engine

framework_metadata: MetaData = include_framework_tables(MetaData())

__all__ = (
    # engine
    "DatabaseConfig",
    "create_database_engine",
    # tables and migrations
    "FRAMEWORK_TABLES",
    "framework_metadata",
    "include_framework_tables",
    "include_name",
    "check_tables",
    "MissingTablesError",
)
