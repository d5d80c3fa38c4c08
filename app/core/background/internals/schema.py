"""The framework's own tables, in one place: for migrations and the start-up check.

Each table is defined next to the code that uses it (the outbox, the
deduplication leases, the run-once completions, the dead letters, the
limits' slots and state). Migrations need them on the application's
metadata (``include_framework_tables``), so that ``alembic revision
--autogenerate`` creates them and never proposes to drop them; a worker
whose tables come from the migrations checks at start that they exist
(``check_worker_tables``).

Not here: the tables of a database result backend (Celery's
``celery_taskmeta``, ``celery_tasksetmeta`` and the running book's
``background_running`` and ``background_worker_heartbeats``). They live in
the result backend's database, which Celery fills at run time itself;
``include_name`` keeps autogenerate away from them when that database is
the application's.
"""

from __future__ import annotations

from collections.abc import Mapping

from sqlalchemy import MetaData, Table
from sqlalchemy.ext.asyncio import AsyncEngine

from .admission.stores import slots_table, state_table
from .delivery.completions import completions_table
from .delivery.lease_stores import leases_table
from .delivery.outbox import outbox_table
from .operations.dead_letters import dead_letters
from .operations.running_book import running_runs, worker_heartbeats
from .session import DatabaseConfig, check_tables, create_engine

# In the application's database.
APP_DATABASE_TABLES: tuple[Table, ...] = (outbox_table, completions_table, dead_letters)
# In the deduplication store's database (the application's unless
# BACKGROUND_DEDUP_DATABASE_URL says otherwise), when it is a database.
DEDUP_DATABASE_TABLES: tuple[Table, ...] = (leases_table, slots_table, state_table)
FRAMEWORK_TABLES: tuple[Table, ...] = APP_DATABASE_TABLES + DEDUP_DATABASE_TABLES

# Created by Celery's database result backend, with the running book beside them.
RESULT_BACKEND_TABLES = frozenset(
    {"celery_taskmeta", "celery_tasksetmeta", running_runs.name, worker_heartbeats.name}
)


def include_framework_tables(metadata: MetaData) -> MetaData:
    """Copy every framework table onto ``metadata`` (one already there is kept); return it."""
    for table in FRAMEWORK_TABLES:
        if table.key not in metadata.tables:
            table.to_metadata(metadata)
    return metadata


def include_name(name: str | None, type_: str, parent_names: Mapping[str, str | None]) -> bool:
    """Alembic's ``include_name`` hook: leave the result backend's tables alone."""
    return not (type_ == "table" and name in RESULT_BACKEND_TABLES)


async def check_worker_tables(
    database_url: str, dedup_database_url: str | None, dead_letters_on: bool
) -> None:
    """Raise ``MissingTablesError`` unless every table a worker needs exists.

    ``dedup_database_url`` None: the leases and limits are not in a database.
    """
    wanted: dict[str, list[Table]] = {
        database_url: [t for t in APP_DATABASE_TABLES if dead_letters_on or t is not dead_letters]
    }
    if dedup_database_url is not None:
        wanted.setdefault(dedup_database_url, []).extend(DEDUP_DATABASE_TABLES)
    for url, tables in wanted.items():
        if url.startswith("sqlite"):
            continue  # a SQLite file gets its tables at run time (session.ensure_table)
        engine: AsyncEngine = create_engine(DatabaseConfig(url=url, pool_size=1))
        try:
            await check_tables(engine, tables)
        finally:
            await engine.dispose()
