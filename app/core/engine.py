"""The application's database engine, built from the settings."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncEngine

from app.core.background.database import DatabaseConfig, create_database_engine
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
