"""How a final failure becomes a dead letter: its reason, its stored arguments, a failed write."""

from __future__ import annotations

import json
import logging
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any
from uuid import UUID

import pytest
from celery.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded, WorkerLostError
from sqlalchemy.exc import IntegrityError

from app.core.background import NonRetriableTaskError, TaskValidationError
from app.core.background.internals.exceptions import (
    TaskArgumentsRefusedError,
    TaskProcessLostError,
)
from app.core.background.internals.operations.dead_letters import (
    MAX_ARGUMENTS_CHARS,
    DeadLetter,
    DeadLetterStore,
    cut,
    encode_arguments,
)
from app.core.background.internals.operations.failures import DeadLetterRecorder, reason_for


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (TimeLimitExceeded(30), "time limit"),
        (SoftTimeLimitExceeded(), "time limit"),
        (TaskProcessLostError("died 3 times"), "worker lost"),
        (WorkerLostError("gone"), "worker lost"),
        (TaskArgumentsRefusedError("missing a required argument"), "refused"),
        (TaskValidationError("bad email"), "non-retriable"),  # raised by the body
        (NonRetriableTaskError("no"), "non-retriable"),
        (IntegrityError("INSERT", {}, Exception("duplicate key")), "non-retriable"),
        (ConnectionError("reset"), "retries exhausted"),
        (RuntimeError("bug"), "retries exhausted"),
    ],
)
def test_the_reason_follows_the_error(error: BaseException, reason: str) -> None:
    assert reason_for(error) == reason


def test_arguments_are_json_and_any_text_is_stored_safely() -> None:
    stored, complete = encode_arguments(["caf\u00e9", "\udcff"], {"n": 1})
    assert complete
    assert stored.isascii()  # a lone surrogate or any non-ASCII text cannot break a column
    assert json.loads(stored) == {"args": ["caf\u00e9", "\udcff"], "kwargs": {"n": 1}}


def test_typed_arguments_come_back_with_their_types_for_a_replay() -> None:
    sent = [Decimal("10.00"), datetime(2026, 12, 4, 12, 0, tzinfo=UTC), UUID(int=7)]
    stored, complete = encode_arguments(sent, {"day": date(2026, 12, 4)})
    assert complete
    letter = DeadLetter(
        task_id="t", task_name="n", queue=None, reason="refused", arguments=stored,
        arguments_complete=complete, error_type="E", error_module=None, error_message="",
        traceback=None, attempts=1, worker=None, first_failed_at=0.0, last_failed_at=0.0,
    )  # fmt: skip
    assert letter.call() == (sent, {"day": date(2026, 12, 4)})


def test_a_value_no_json_can_hold_is_kept_as_text_and_not_replayable() -> None:
    stored, complete = encode_arguments([object()], {})
    assert not complete
    assert "<object object at" in stored


def test_huge_arguments_are_cut_and_marked_incomplete() -> None:
    stored, complete = encode_arguments(["x" * (MAX_ARGUMENTS_CHARS + 10)], {})
    assert not complete
    assert len(stored) == MAX_ARGUMENTS_CHARS
    assert cut("y" * 20, limit=5) == "yyyyy\n... (15 more characters not kept)"
    assert cut("short", limit=5) == "short"


class _FailingStore(DeadLetterStore):
    def __init__(self) -> None:
        pass

    async def record(self, letter: Any) -> None:
        raise ConnectionRefusedError("database down")


def test_a_failed_write_is_logged_and_the_task_outcome_stands(
    caplog: pytest.LogCaptureFixture,
) -> None:
    recorder = DeadLetterRecorder(store=_FailingStore)
    with caplog.at_level(logging.ERROR):
        recorder.on_task_failure(
            sender=None, task_id="t-1", exception=RuntimeError("boom"), args=[1], kwargs={}
        )
    assert [r.getMessage() for r in caplog.records] == [
        "Could not record the dead letter of task t-1 (unknown): "
        "ConnectionRefusedError: database down"
    ]
