"""Type-checked by mypy (``[tool.mypy] files``), never run: dispatch keeps the task's signature.

Each wrong call carries the exact ``type: ignore[code]`` mypy must report; with
``warn_unused_ignores`` (strict) a check that stopped catching the mistake
fails the type check. pytest collects nothing here (no ``test_`` functions).
"""

from __future__ import annotations

from celery.result import AsyncResult
from sqlalchemy.ext.asyncio import AsyncSession

from app.entities.tasks import process_entity
from app.notifications.tasks import send_notification


def correct_calls(session: AsyncSession) -> None:
    result: AsyncResult[dict[str, object]] = process_entity.delay(entity_id="id")
    process_entity.delay("id")
    process_entity.delay_on_commit(session, entity_id="id")
    process_entity.delay_via_outbox(session, "id")
    process_entity.options(countdown=5, queue="high_priority").delay(entity_id="id")
    process_entity.options(task_id="mine").delay_on_commit(session, entity_id="id")
    send_notification.delay(user_id="u", message="hi")
    # Celery's own apply_async stays as it is (args as a tuple, kwargs as a dict).
    send_notification.apply_async(kwargs={"user_id": "u", "message": "hi"}, countdown=1)
    del result


def wrong_calls(session: AsyncSession) -> None:
    process_entity.delay(entity="id")  # type: ignore[call-arg]
    process_entity.delay(entity_id=1)  # type: ignore[arg-type]
    process_entity.delay()  # type: ignore[call-arg]
    process_entity.delay_on_commit(session, entity="id")  # type: ignore[call-arg]
    process_entity.delay_on_commit(entity_id="id")  # type: ignore[call-arg]
    process_entity.delay_via_outbox(session, entity_id=None)  # type: ignore[arg-type]
    process_entity.options(countdown=5).delay(wrong="id")  # type: ignore[call-arg]
    process_entity.options(queue="nope").delay(entity_id="id")  # type: ignore[arg-type]
    process_entity.options(retries=3)  # type: ignore[call-arg]
    send_notification.delay(user_id="u")  # type: ignore[call-arg]
