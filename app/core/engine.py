"""The application's database engine, built from the settings."""

from __future__ import annotations

import logging

from sqlalchemy.ext.asyncio import AsyncEngine

from app.core.background.database import (
    DatabaseConfig,
    MissingTablesError,
    check_tables,
    create_database_engine,
)
from app.core.config import Settings
from app.core.database import Base


def engine_from_settings(settings: Settings) -> AsyncEngine:
    return create_database_engine(
        DatabaseConfig(
            url=settings.database_url,
            pool_size=settings.database_pool_size,
            max_overflow=settings.database_max_overflow,
            pool_timeout=settings.database_pool_timeout,
            pool_pre_ping=settings.database_pool_pre_ping,
        )
    )


async def create_tables(engine: AsyncEngine) -> None:
    """Create every table of ``app/models.py`` (the application's and the framework's)."""
    import app.models  # noqa: F401 - the registry puts every table on Base.metadata

    async with engine.begin() as connection:
        await connection.run_sync(Base.metadata.create_all)


async def check_migrated(engine: AsyncEngine) -> None:
    """Raise ``MissingTablesError`` unless every table of ``app/models.py`` exists.

    For a database whose tables come from the migrations (``alembic upgrade
    head``). A database that does not answer yet is logged, not raised: the
    health check and the requests report it.
    """
    import app.models  # noqa: F401 - the registry puts every table on Base.metadata

    try:
        await check_tables(engine, Base.metadata.sorted_tables)
    except MissingTablesError:
        raise
    except Exception as exc:  # noqa: BLE001 - the database may come up later
        logging.getLogger(__name__).warning(
            "Could not check the tables at start",
            extra={"fields": {"error": f"{type(exc).__name__}: {exc}"}},
        )
