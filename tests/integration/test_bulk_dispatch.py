"""Bulk dispatch (``task.delay_many``) against the real worker, Redis and PostgreSQL."""

from __future__ import annotations

import uuid

import pytest

from app.core.background import TaskArgumentError
from app.core.background.dispatch import dispatch_many
from tests.support import tasks
from tests.support.db import fetchval
from tests.support.services import Services

pytestmark = pytest.mark.usefixtures("worker")

RESULT_TIMEOUT = 60


def test_delay_many_sends_every_call_and_each_result_is_readable(stack: Services) -> None:
    prefix = uuid.uuid4().hex[:12]
    keys = [f"{prefix}-{i}" for i in range(120)]
    results = tasks.record.delay_many([{"key": key} for key in keys], batch_size=50)
    assert len(results) == len(keys)
    assert len({result.id for result in results}) == len(keys)
    for key, result in zip(keys, results, strict=True):
        assert result.get(timeout=RESULT_TIMEOUT)["key"] == key
    count = fetchval(stack, "SELECT count(*) FROM test_records WHERE key LIKE $1", prefix + "%")
    assert count == len(keys)


def test_one_bad_call_sends_none(stack: Services, redis_client: object) -> None:
    prefix = uuid.uuid4().hex[:12]
    calls = [{"key": f"{prefix}-ok"}, {"wrong": "argument"}]
    with pytest.raises(TaskArgumentError, match=r"tests\.record"):
        tasks.record.delay_many(calls)
    with pytest.raises(TaskArgumentError, match="JSON-serializable"):
        dispatch_many(tasks.record, [{"key": object()}])
    # Nothing of the refused bulk call reaches the worker.
    assert tasks.record.delay(key=f"{prefix}-after").get(timeout=RESULT_TIMEOUT)
    count = fetchval(stack, "SELECT count(*) FROM test_records WHERE key LIKE $1", prefix + "%")
    assert count == 1


def test_per_call_options_are_refused_and_empty_is_a_no_op() -> None:
    with pytest.raises(TaskArgumentError, match="task_id"):
        tasks.record.delay_many([{"key": "x"}], task_id="one-id-for-many")
    assert tasks.record.delay_many([]) == []


def test_options_apply_to_every_message(stack: Services) -> None:
    prefix = uuid.uuid4().hex[:12]
    results = tasks.record.delay_many(
        [{"key": f"{prefix}-{i}"} for i in range(3)], countdown=0.2, priority=3
    )
    for result in results:
        assert result.get(timeout=RESULT_TIMEOUT)["status"] == "success"


def test_bulk_dispatched_tasks_are_known_to_the_status_api_at_once() -> None:
    from app.core.background import celery_app
    from app.core.background.internals.operations.status import get_task_status

    prefix = uuid.uuid4().hex[:12]
    results = tasks.record.delay_many([{"key": f"{prefix}-{i}"} for i in range(20)])
    # SENT was written before each message was published: never "unknown".
    assert all(get_task_status(celery_app, r.id).known for r in results)
    for result in results:
        result.get(timeout=RESULT_TIMEOUT)
    assert {get_task_status(celery_app, r.id).state for r in results} == {"success"}
