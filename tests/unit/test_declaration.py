"""Declaring tasks: every mistake is caught at import time, with a clear message."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from app.core.background import (
    RETRY_POLICIES,
    DatabaseTask,
    TaskContext,
    TaskDefinitionError,
    celery_app,
    db_task,
    simple_task,
)
from app.core.background.internals.base import AsyncTask, SyncTask
from app.core.background.internals.registry import registry


@pytest.fixture
def task_name() -> Iterator[str]:
    """A unique task name, unregistered again after the test."""
    name = f"unit.{uuid.uuid4().hex[:8]}"
    yield name
    registry.release(name)
    celery_app.tasks.pop(name, None)


def test_simple_task_on_sync_and_async_functions(task_name: str) -> None:
    @simple_task(name=task_name)
    def sync_body(ctx: TaskContext, x: int) -> int:
        return x

    assert isinstance(sync_body, SyncTask)
    registry.release(task_name)
    celery_app.tasks.pop(task_name)

    @simple_task(name=task_name)
    async def async_body(ctx: TaskContext, x: int) -> int:
        return x

    assert isinstance(async_body, AsyncTask)


def test_db_task_requires_async_def(task_name: str) -> None:
    with pytest.raises(TaskDefinitionError, match="needs an 'async def'"):

        @db_task(name=task_name)  # type: ignore[arg-type]
        def body(ctx: TaskContext) -> None: ...


def test_unknown_retry_policy_lists_valid_names(task_name: str) -> None:
    with pytest.raises(TaskDefinitionError) as raised:

        @simple_task(name=task_name, retry_policy="sometimes")  # type: ignore[arg-type]
        def body(ctx: TaskContext) -> None: ...

    message = str(raised.value)
    assert "'sometimes'" in message
    for name in RETRY_POLICIES:
        assert name in message


def test_unknown_queue_lists_valid_names(task_name: str) -> None:
    valid = "valid: high_priority, default, low_priority"
    with pytest.raises(TaskDefinitionError, match=f"unknown queue 'urgent'; {valid}"):

        @simple_task(name=task_name, queue="urgent")  # type: ignore[arg-type]
        def body(ctx: TaskContext) -> None: ...


@pytest.mark.parametrize("name", ["", "   "])
def test_name_is_required(name: str) -> None:
    with pytest.raises(TaskDefinitionError, match="name is required"):

        @simple_task(name=name)
        def body(ctx: TaskContext) -> None: ...


def test_duplicate_name_names_both_functions(task_name: str) -> None:
    @simple_task(name=task_name)
    def first(ctx: TaskContext) -> None: ...

    with pytest.raises(TaskDefinitionError) as raised:

        @simple_task(name=task_name)
        def second(ctx: TaskContext) -> None: ...

    message = str(raised.value)
    assert "test_duplicate_name_names_both_functions.<locals>.first" in message
    assert "test_duplicate_name_names_both_functions.<locals>.second" in message


def test_task_without_context_parameter_is_refused(task_name: str) -> None:
    with pytest.raises(TaskDefinitionError, match="first parameter must be the TaskContext") as e:

        @simple_task(name=task_name)  # type: ignore[arg-type]
        def body() -> None: ...

    assert "got no parameter" in str(e.value)
    assert "def body(ctx: TaskContext)" in str(e.value)


def test_first_parameter_that_is_not_the_context_is_refused_with_the_right_form(
    task_name: str,
) -> None:
    with pytest.raises(TaskDefinitionError) as raised:

        @simple_task(name=task_name)
        def f(x: int, y: str = "a") -> None: ...

    message = str(raised.value)
    assert "first parameter must be the TaskContext" in message
    assert "got (x: int, y: str = 'a')" in message
    assert "def f(ctx: TaskContext, x: int, y: str = 'a')" in message
    assert task_name not in celery_app.tasks  # nothing was registered


def test_db_task_first_parameter_is_checked_too(task_name: str) -> None:
    with pytest.raises(TaskDefinitionError, match=r"def g\(ctx: TaskContext, entity_id: str\)"):

        @db_task(name=task_name)
        async def g(entity_id: str) -> None: ...


def test_keyword_only_context_is_refused(task_name: str) -> None:
    with pytest.raises(TaskDefinitionError, match="first parameter must be the TaskContext"):

        @simple_task(name=task_name)
        def a(*, ctx: TaskContext) -> None: ...


def test_var_positional_context_is_refused(task_name: str) -> None:
    with pytest.raises(TaskDefinitionError, match="first parameter must be the TaskContext"):

        @simple_task(name=task_name)
        def b(*ctx: TaskContext) -> None: ...


class _MyContext(TaskContext):
    pass


def _annotated_ctx(ctx: TaskContext, x: int) -> None: ...
# This module's annotations are text (``from __future__ import annotations``),
# as in most task modules: the decorator resolves them, or judges them by name.
def _dotted_annotation(c: bg.TaskContext) -> None: ...  # type: ignore[name-defined]  # noqa: F821
def _other_name(task_ctx: TaskContext) -> None: ...
def _subclass(c: _MyContext) -> None: ...
def _unannotated_ctx(ctx, x):  # type: ignore[no-untyped-def]
    ...
def _unannotated_context(context, x):  # type: ignore[no-untyped-def]
    ...


@pytest.mark.parametrize(
    "fn",
    [
        _annotated_ctx,
        _dotted_annotation,
        _other_name,
        _subclass,
        _unannotated_ctx,
        _unannotated_context,
    ],
)
def test_the_accepted_forms_of_the_context_parameter(task_name: str, fn: Any) -> None:
    """Annotated TaskContext (or a subclass, or its name as text), or named ctx/context."""
    assert simple_task(name=task_name)(fn).name == task_name


def test_an_evaluated_annotation_is_checked_by_type(task_name: str) -> None:
    namespace: dict[str, Any] = {"TaskContext": TaskContext, "int": int}
    exec("def h(job: TaskContext) -> None: ...\ndef i(job: int) -> None: ...", namespace)
    assert simple_task(name=task_name)(namespace["h"]).name == task_name
    with pytest.raises(TaskDefinitionError, match=r"got \(job: int\)"):
        simple_task(name=f"{task_name}.i")(namespace["i"])


@pytest.mark.parametrize("decorator", [simple_task, db_task])
def test_decorator_without_parentheses_shows_the_right_form(decorator: Any) -> None:
    with pytest.raises(TaskDefinitionError) as raised:

        @decorator
        async def notify(ctx: TaskContext, user_id: str) -> None: ...

    message = str(raised.value)
    name = decorator.__name__
    assert f"@{name} needs its arguments" in message
    assert f'@{name}(name="module.task_name"' in message
    assert "notify" in message


@pytest.mark.parametrize("decorator", [simple_task, db_task])
def test_decorator_without_a_name_shows_the_right_form(decorator: Any) -> None:
    with pytest.raises(TaskDefinitionError, match=r"name is required: @\w+\(name="):
        decorator(retry_policy="standard")


def test_unknown_celery_option_is_refused(task_name: str) -> None:
    with pytest.raises(TaskDefinitionError, match="'time_limt' is not a Celery task option"):

        @simple_task(name=task_name, time_limt=5)
        def body(ctx: TaskContext) -> None: ...


@pytest.mark.parametrize("option", ["max_retries", "bind", "serializer", "autoretry_for"])
def test_options_owned_by_the_framework_are_refused(task_name: str, option: str) -> None:
    with pytest.raises(TaskDefinitionError, match="set by the framework"):
        simple_task(name=task_name, **{option: 1})(lambda ctx: None)


def test_celery_options_pass_through(task_name: str) -> None:
    @simple_task(
        name=task_name,
        time_limit=7,
        soft_time_limit=5,
        ignore_result=True,
        acks_on_failure_or_timeout=True,
    )
    def body(ctx: TaskContext) -> None: ...

    assert (body.time_limit, body.soft_time_limit) == (7, 5)
    assert body.ignore_result is True


def test_rate_limit_is_the_frameworks_shared_limit_not_celerys_per_process_one(
    task_name: str,
) -> None:
    @simple_task(name=task_name, rate_limit="10/s")
    def body(ctx: TaskContext) -> None: ...

    assert body.limits is not None
    assert body.limits.rate is not None
    assert body.limits.rate.per_second == 10
    # Celery's own limiter (per worker process, holding a prefetch slot) stays off.
    assert body.rate_limit is None


@pytest.mark.parametrize("policy", list(RETRY_POLICIES))
def test_policy_sets_retries_and_default_time_limits(task_name: str, policy: Any) -> None:
    @db_task(name=task_name, retry_policy=policy, queue="low_priority")
    async def body(ctx: TaskContext) -> None: ...

    expected = RETRY_POLICIES[policy]
    assert isinstance(body, DatabaseTask)
    assert body.max_retries == expected.max_retries
    assert (body.soft_time_limit, body.time_limit) == (
        expected.soft_time_limit,
        expected.time_limit,
    )
    assert body.background_queue == "low_priority"


def test_long_running_gets_more_time_than_standard() -> None:
    assert RETRY_POLICIES["long_running"].time_limit > RETRY_POLICIES["standard"].time_limit


def test_redeclaring_the_same_function_returns_the_same_task(task_name: str) -> None:
    def body(ctx: TaskContext) -> None: ...

    first = simple_task(name=task_name)(body)
    assert simple_task(name=task_name)(body) is first
