"""``background_db_session`` on an empty PostgreSQL database: the project's tables are there.

A user's fixture used to fail with ``relation "entities" does not exist`` on a
database nobody had created tables in. The tables are made inside the test's
own transaction, so the database is empty again afterwards.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import asyncpg
import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from app.core.background import TaskTestContext
from app.entities.crud import entity_crud
from app.entities.models import Entity
from app.entities.tasks import process_entity
from tests.support.services import Services, _create_database, _drop_database

pytestmark = pytest.mark.postgres


@pytest.fixture(scope="module")
def empty_database(postgres_service: Services) -> Iterator[str]:
    name = f"bgempty_{uuid.uuid4().hex[:10]}"
    asyncio.run(_create_database(name))
    base = postgres_service.postgres_url.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        asyncio.run(_drop_database(name))


@pytest.fixture(scope="module")
def background_database_url(empty_database: str) -> str:
    """The plugin's fixtures use the empty database in this module."""
    return empty_database


async def test_a_task_runs_on_a_database_without_tables(
    background_db_session: AsyncSession,
) -> None:
    entity = await entity_crud.create(background_db_session, "fresh")
    await background_db_session.commit()
    await process_entity(TaskTestContext(session=background_db_session), entity_id=str(entity.id))
    await background_db_session.refresh(entity)
    assert entity.processed_count == 1
    count = await background_db_session.scalar(select(func.count()).select_from(Entity))
    assert count == 1


async def test_the_tables_are_gone_after_the_test(empty_database: str) -> None:
    dsn = empty_database.replace("postgresql+asyncpg://", "postgresql://")
    connection = await asyncpg.connect(dsn)
    try:
        tables = await connection.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
        )
    finally:
        await connection.close()
    assert tables == []
