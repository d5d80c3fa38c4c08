"""The application's database: declarative base, engine and the session dependency."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import DeclarativeBase

from app.core.background import DatabaseConfig, TaskSession, create_database_engine, outbox_table
from app.core.config import Settings


class Base(DeclarativeBase):
    """Base class of the application's models."""


# The framework's outbox table, on the app's metadata: created with the app's
# tables (and seen by Alembic's autogenerate).
outbox_table.to_metadata(Base.metadata)


def engine_from_settings(settings: Settings) -> AsyncEngine:
    return create_database_engine(
        DatabaseConfig(
            url=settings.database_url,
            pool_size=settings.database_pool_size,
            pool_pre_ping=settings.database_pool_pre_ping,
        )
    )


async def create_tables(engine: AsyncEngine) -> None:
    # Import the models so that their tables are on Base.metadata.
    import app.models  # noqa: F401

    async with engine.begin() as connection:
        await connection.run_sync(Base.metadata.create_all)


async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    sessions: async_sessionmaker[AsyncSession] = request.app.state.sessions
    async with sessions() as session:
        yield session


SessionDep = Annotated[AsyncSession, Depends(get_session)]


async def get_task_session(request: Request) -> AsyncIterator[TaskSession]:
    """A session whose ``commit()`` then sends the tasks registered with ``delay_on_commit``."""
    sessions: async_sessionmaker[TaskSession] = request.app.state.task_sessions
    async with sessions() as session:
        yield session


TaskSessionDep = Annotated[TaskSession, Depends(get_task_session)]
