"""Alembic's environment: the application's engine, every table of ``app/models.py``.

The database is the application's (``DATABASE_URL``, read by
``app.core.config``), opened by the application's own async engine.
``app/models.py`` puts the framework's tables (outbox, leases, completions,
dead letters, limits) on ``Base.metadata`` next to the application's, so
autogenerate creates them and never proposes to drop them;
``include_name`` keeps it away from a database result backend's tables
(Celery's) when they share the database. SQLite gets batch operations
(``render_as_batch``): its ``ALTER TABLE`` cannot change a column.

A caller that already holds a connection (a test, a script) passes it as
``config.attributes["connection"]``.
"""

from __future__ import annotations

import asyncio
from logging.config import fileConfig
from typing import Any

from alembic import context
from sqlalchemy.engine import Connection

import app.models  # noqa: F401 - every table on Base.metadata, the framework's included
from app.core.background.database import include_name
from app.core.config import get_settings
from app.core.database import Base
from app.core.engine import engine_from_settings

config = context.config
if config.config_file_name is not None and config.attributes.get("connection") is None:
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = Base.metadata


def _options(dialect_name: str) -> dict[str, Any]:
    return {
        "target_metadata": target_metadata,
        "include_name": include_name,
        "render_as_batch": dialect_name == "sqlite",
        "compare_type": True,
    }


def run_migrations_offline() -> None:
    """``alembic upgrade --sql``: the SQL for the configured database, not run."""
    url = get_settings().database_url
    context.configure(
        url=url,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        **_options(url.split(":", 1)[0].split("+", 1)[0]),
    )
    with context.begin_transaction():
        context.run_migrations()


def do_run_migrations(connection: Connection) -> None:
    context.configure(connection=connection, **_options(connection.dialect.name))
    with context.begin_transaction():
        context.run_migrations()


async def run_async_migrations() -> None:
    engine = engine_from_settings(get_settings())
    try:
        async with engine.connect() as connection:
            await connection.run_sync(do_run_migrations)
    finally:
        await engine.dispose()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is None:
        asyncio.run(run_async_migrations())
    else:
        do_run_migrations(connection)


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
