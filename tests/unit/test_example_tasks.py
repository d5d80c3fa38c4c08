"""The example tasks, tested the way a user of the framework would test theirs.

No broker and no worker: a ``TaskTestContext`` with a mock session, the real
SQLite database of ``task_db_session``, and the plugin's
``background_task_context`` fixture.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from app.core.background import (
    TaskNotFoundError,
    TaskTestContext,
    TaskValidationError,
    mock_task_session,
)
from app.core.background.testing import task_db_session
from app.entities.crud import entity_crud
from app.entities.models import Entity
from app.entities.tasks import process_entity
from app.notifications.tasks import send_notification

# -- process_entity (a @db_task), on a mock session --------------------------------


def new_entity() -> Entity:
    return Entity(id=uuid.uuid4(), name="thing", status="new", processed_count=0)


async def test_process_entity_marks_it_processed_and_commits() -> None:
    entity = new_entity()
    session = mock_task_session([entity])
    ctx = TaskTestContext(session=session)

    result = await process_entity(ctx, entity_id=str(entity.id))

    assert result == {"status": "success", "task_id": ctx.task_id, "entity_id": str(entity.id)}
    assert (entity.status, entity.processed_count) == ("processed", 1)
    assert entity.processed_at is not None
    ctx.assert_logged_success("Entity processed", entity_id=str(entity.id))
    ctx.assert_no_errors()
    session.assert_committed(times=1)


async def test_process_entity_not_found_rolls_back() -> None:
    session = mock_task_session()  # holds no entity
    ctx = TaskTestContext(session=session)
    missing = str(uuid.uuid4())

    with pytest.raises(TaskNotFoundError, match="Entity not found") as raised:
        await process_entity(ctx, entity_id=missing)

    assert raised.value.fields == {"entity_id": missing}
    session.assert_rolled_back()
    assert session.commits == 0
    ctx.assert_not_logged("success")


async def test_process_entity_rejects_a_bad_id_before_touching_the_database() -> None:
    session = mock_task_session()
    with pytest.raises(TaskValidationError, match="entity_id is not a valid UUID"):
        await process_entity(TaskTestContext(session=session), entity_id="uuid-here")
    session.get.assert_not_awaited()
    session.assert_rolled_back()


# -- process_entity on a real database, rolled back at the end -------------------


async def test_process_entity_on_a_real_sqlite_database(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'app.db'}"
    async with task_db_session(url, create_tables=[Entity.__table__]) as session:
        entity = await entity_crud.create(session, name="real")
        await session.commit()
        ctx = TaskTestContext(session=session)

        await process_entity(ctx, entity_id=str(entity.id))
        await process_entity(ctx, entity_id=str(entity.id))

        await session.refresh(entity)
        assert (entity.status, entity.processed_count) == ("processed", 2)
        # Per run: the task's own success line, then the framework's.
        successes = [record.message for record in ctx.logged("success")]
        assert successes[1::2] == ["Task succeeded", "Task succeeded"]
        assert len(successes) == 4


# -- send_notification (a sync @simple_task), with the plugin's fixture ------------


def test_send_notification(background_task_context: TaskTestContext) -> None:
    ctx = background_task_context
    user_id = str(uuid.uuid4())

    result = send_notification(ctx, user_id=user_id, message="Hello")

    assert result["sent"] is True
    assert result["user_id"] == user_id
    ctx.assert_logged("info", contains="Sending", user_id=user_id, length=5)
    assert ctx.task_name == "notifications.send_notification"
    assert not ctx.has_session


def test_send_notification_rejects_a_bad_user_id(
    background_task_context: TaskTestContext,
) -> None:
    with pytest.raises(TaskValidationError, match="user_id"):
        send_notification(background_task_context, user_id="nobody", message="Hello")
    background_task_context.assert_not_logged("info", contains="Sending")
    assert background_task_context.results == []
