"""An outbox row is the message as JSON: what cannot be stored is refused when it is written."""

from __future__ import annotations

import json

import pytest

from app.core.background.internals.delivery.outbox import outbox_row
from app.core.background.internals.delivery.publish import Message
from tests.support import tasks


def test_a_row_keeps_the_queue_the_task_routes_to() -> None:
    row = outbox_row(Message(tasks.urgent, kwargs={"a": 1}, task_id="id-1"))
    assert (row["task_id"], row["task_name"]) == ("id-1", "tests.urgent")
    assert json.loads(row["payload"]) == [[], {"a": 1}, {"queue": "high_priority"}]


def test_options_that_cannot_be_stored_are_refused_naming_the_task() -> None:
    with pytest.raises(ValueError, match=r"tests\.urgent: options must be JSON-serializable"):
        outbox_row(Message(tasks.urgent, options={"headers": {"when": object()}}))
