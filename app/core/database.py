"""The application's database: declarative base, engine and the session dependency."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import DeclarativeBase

from app.core.background import DatabaseConfig, create_database_engine
from app.core.config import Settings


class Base(DeclarativeBase):
    """Base class of the application's models."""


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
