"""TaskContext: validation, errors and the result envelope."""

from __future__ import annotations

import uuid

import pytest

from app.core.background import (
    TaskConfigurationError,
    TaskContext,
    TaskNotFoundError,
    TaskValidationError,
)


@pytest.fixture
def ctx() -> TaskContext:
    return TaskContext(task_id="abc", task_name="unit.ctx", attempt=2, queue="default")


def test_identity(ctx: TaskContext) -> None:
    assert (ctx.task_id, ctx.task_name, ctx.attempt, ctx.queue) == ("abc", "unit.ctx", 2, "default")


def test_validate_uuid_returns_a_uuid(ctx: TaskContext) -> None:
    value = uuid.uuid4()
    assert ctx.validate_uuid(str(value), "user_id") == value
    assert ctx.validate_uuid(value, "user_id") is value


@pytest.mark.parametrize("value", ["not-a-uuid", "", None, 42, "1234"])
def test_validate_uuid_rejects_with_the_field_name(ctx: TaskContext, value: object) -> None:
    with pytest.raises(TaskValidationError, match="user_id is not a valid UUID") as raised:
        ctx.validate_uuid(value, "user_id")
    assert raised.value.fields["field"] == "user_id"


def test_error_factories_return_non_retriable_errors(ctx: TaskContext) -> None:
    assert isinstance(ctx.not_found_error("User not found", user_id="1"), TaskNotFoundError)
    assert isinstance(ctx.validation_error("Invalid input", field="email"), TaskValidationError)
    assert isinstance(ctx.config_error("Missing API key"), TaskConfigurationError)
    assert ctx.not_found_error("User not found", user_id="1").fields == {"user_id": "1"}


def test_success_result_envelope(ctx: TaskContext) -> None:
    assert ctx.success_result(user_id="u", count=3) == {
        "status": "success",
        "task_id": "abc",
        "user_id": "u",
        "count": 3,
    }


def test_success_result_keeps_reserved_keys_under_result_prefix(ctx: TaskContext) -> None:
    # The specification's own example passes status="created".
    result = ctx.success_result(user_id="u", status="created")
    assert result["status"] == "success"
    assert result["result_status"] == "created"
    assert ctx.success_result(task_id="other")["task_id"] == "abc"
    assert ctx.success_result(task_id="other")["result_task_id"] == "other"


def test_session_outside_a_db_task_is_a_clear_error(ctx: TaskContext) -> None:
    with pytest.raises(TaskConfigurationError, match="only available in @db_task"):
        _ = ctx.session
