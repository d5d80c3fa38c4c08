"""The one send path (``delivery/publish.py``): headers, the SENT record, the count."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from celery import Celery, signals
from prometheus_client import REGISTRY

from app.core.background import TaskArgumentError, TaskDispatchError, celery_app
from app.core.background.internals.delivery.publish import (
    Message,
    bounded_dispatch,
    checked_message,
    publish,
)
from app.core.background.internals.logging import HIDDEN_VALUES
from app.core.background.internals.operations.status import raw_meta
from app.core.background.internals.registry import TOKEN_HEADER
from tests.support import tasks
from tests.support.services import Services

WAIT = 30


def test_the_framework_headers_join_celerys_headers() -> None:
    message = Message(
        tasks.always_fails, options={"headers": {"mine": 1}, "producer": object()},
        headers={TOKEN_HEADER: "t"},
    )  # fmt: skip
    options = message.celery_options()
    assert options == {"headers": {"mine": 1, TOKEN_HEADER: "t"}}  # the producer is publish's
    assert Message(tasks.always_fails, options={"countdown": 1}).celery_options() == {
        "countdown": 1
    }


def test_a_checked_message_gets_a_fresh_id_unless_given_one() -> None:
    first, second = (checked_message(tasks.where_am_i, (), {}, {}) for _ in range(2))
    assert first.task_id != second.task_id
    assert uuid.UUID(first.task_id)
    given = checked_message(tasks.where_am_i, (), {}, {"task_id": "mine", "countdown": 1})
    assert (given.task_id, given.options) == ("mine", {"countdown": 1})


def test_a_message_goes_to_its_option_or_its_tasks_queue() -> None:
    assert Message(tasks.urgent).queue == "high_priority"
    assert Message(tasks.urgent, options={"queue": "low_priority"}).queue == "low_priority"
    assert Message("some.task.by.name").queue == "default"


def test_a_failed_dispatch_says_how_long_it_tried() -> None:
    app = Celery("bounded", set_as_current=False, backend="cache+memory://")
    with (
        pytest.raises(TaskDispatchError, match=r"was not sent within 0\.\ds") as raised,
        bounded_dispatch(app, "t.name", "default", ["id-1"]),
    ):
        raise ConnectionRefusedError("refused")
    assert raised.value.task_ids == ("id-1",)


def test_an_inner_dispatch_leaves_the_failure_to_the_outer_one() -> None:
    """A lease and its publish, each bounded: one TaskDispatchError, from the outermost block."""
    app = Celery("nested", set_as_current=False, backend="cache+memory://")
    with (
        pytest.raises(TaskDispatchError) as raised,
        bounded_dispatch(app, "outer", "default", ["o-1"]),
        bounded_dispatch(app, "inner", "default", ["i-1"]),
    ):
        raise ConnectionRefusedError("refused")
    assert raised.value.task_name == "outer"
    assert raised.value.task_ids == ("o-1",)


def _dispatched(task_name: str, queue: str) -> float:
    labels = {"task": task_name, "queue": queue}
    return REGISTRY.get_sample_value("background_tasks_dispatched_total", labels) or 0.0


def test_a_sent_task_has_its_sent_record_first_and_is_counted(stack: Services, worker: Any) -> None:
    """The SENT record exists when the message is published, not later (a fast worker's
    STARTED or SUCCESS must never be overwritten by it); the dispatch is counted once."""
    records: dict[str, Any] = {}

    def look(headers: Any = None, **_: Any) -> None:
        task_id = str((headers or {}).get("id"))
        records[task_id] = raw_meta(celery_app, task_id)

    before = _dispatched("tests.where_am_i", "default")
    signals.after_task_publish.connect(look, weak=False)
    try:
        result = tasks.where_am_i.delay()
    finally:
        signals.after_task_publish.disconnect(look)
    assert records[result.id] is not None
    assert _dispatched("tests.where_am_i", "default") == before + 1
    result.get(timeout=WAIT)


def test_a_bulk_send_counts_every_message(stack: Services, worker: Any) -> None:
    before = _dispatched("tests.where_am_i", "default")
    results = tasks.where_am_i.delay_many([{}, {}, {}])
    assert _dispatched("tests.where_am_i", "default") == before + 3
    for result in results:
        result.get(timeout=WAIT)


def test_arguments_that_cannot_be_encoded_leave_no_sent_record(stack: Services) -> None:
    """Celery writes SENT before kombu encodes: a message that never left has no status."""
    message = Message(tasks.echo, kwargs={"payload": object()})
    with pytest.raises(TaskArgumentError, match="JSON-serializable"):
        publish(celery_app, message)
    assert raw_meta(celery_app, message.task_id) is None


def _published_headers(send: Any) -> dict[str, Any]:
    seen: dict[str, Any] = {}

    def look(headers: Any = None, **_: Any) -> None:
        seen.update(headers or {})

    signals.before_task_publish.connect(look, weak=False)
    try:
        send()
    finally:
        signals.before_task_publish.disconnect(look)
    return seen


def test_messages_show_their_arguments_only_when_logging_them_is_allowed(stack: Services) -> None:
    """Celery copies a repr of the arguments into each message (events, Flower, inspect)."""

    def send() -> None:
        tasks.echo.delay(password="hunter2")

    headers = _published_headers(send)
    assert (headers["argsrepr"], headers["kwargsrepr"]) == (HIDDEN_VALUES, HIDDEN_VALUES)
    celery_app.conf.background_log_task_arguments = True
    try:
        headers = _published_headers(send)
    finally:
        celery_app.conf.background_log_task_arguments = False
    assert "hunter2" in headers["kwargsrepr"]
