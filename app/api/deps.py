"""FastAPI dependencies: a session per request, and one that sends tasks on commit."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.core.background.fastapi import TaskSession


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
