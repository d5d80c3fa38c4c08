"""TaskTestContext and mock_task_session: no broker, no worker, no database.

A test helper that cannot fail proves nothing, so every assertion is also
shown failing, with the recorded log in its message.
"""

from __future__ import annotations

import inspect
import subprocess
import sys
import uuid
from importlib.metadata import entry_points

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from app.core.background import (
    TaskConfigurationError,
    TaskContext,
    TaskTestContext,
    TaskValidationError,
    mock_task_session,
)
from app.core.background.testing import LoggedRecord
from tests.support.models import Record
from tests.support.tasks_testing import (
    count_down,
    flaky,
    my_db_task,
    peek_session,
    shout,
    write_in_batches,
    write_then_fail,
)

# -- the specification's example, exactly as written ---------------------------


# fmt: off
async def test_my_db_task():
    ctx = TaskTestContext(
        task_id="test-123",
        session=mock_task_session()
    )

    result = await my_db_task(ctx, entity_id="uuid-here")

    assert result["status"] == "success"
    ctx.assert_logged_success()
# fmt: on


# -- the lifecycle records a worker writes, on the test's context ----------------


async def test_success_is_recorded_as_on_a_worker() -> None:
    ctx = TaskTestContext()
    await my_db_task(ctx, entity_id="e1")
    ctx.assert_logged_success("Task succeeded")
    assert ctx.logger.fields["outcome"] == "success"
    assert ctx.messages == ["Task succeeded"]  # my_db_task logs nothing itself


def test_success_of_a_sync_task_is_recorded() -> None:
    ctx = TaskTestContext()
    shout(ctx, "hi")
    assert ctx.messages == ["Shouting", "Task succeeded"]


async def test_a_non_retriable_failure_is_recorded_with_its_classification() -> None:
    ctx = TaskTestContext()
    with pytest.raises(TaskValidationError):
        await write_then_fail(ctx, key="k")
    ctx.assert_logged(
        "error",
        "Task failed",
        reason="non-retriable",
        error_type="TaskValidationError",
    )
    assert ctx.logger.fields["outcome"] == "failure"
    ctx.assert_not_logged("success")
    ctx.assert_not_logged("warning", "will retry")


async def test_a_retriable_failure_is_recorded_as_a_retry_with_its_delay() -> None:
    ctx = TaskTestContext()
    with pytest.raises(ConnectionError):  # reaches the test: nothing is retried here
        await flaky(ctx, key="k")
    record = ctx.assert_logged("warning", "Task failed, will retry", error_type="ConnectionError")
    # standard: 60 s x BACKGROUND_RETRY_DELAY_SCALE (0.01 in these tests), + up to 25%.
    assert 0.6 <= record.fields["retry_in"] <= 0.75
    ctx.assert_not_logged("error")


async def test_the_last_attempt_is_recorded_as_retries_exhausted() -> None:
    ctx = TaskTestContext(attempt=3)  # standard allows 3 retries: this was the last
    with pytest.raises(ConnectionError):
        await flaky(ctx, key="k")
    ctx.assert_logged("error", "Task failed", reason="retries exhausted")
    ctx.assert_not_logged("warning")


# -- calling a task with a context ----------------------------------------------


def test_sync_simple_task_returns_its_value_directly() -> None:
    ctx = TaskTestContext()
    result = shout(ctx, "hello")
    assert result == {"status": "success", "task_id": ctx.task_id, "text": "HELLO"}
    ctx.assert_logged("info", contains="Shout", length=5)


async def test_async_simple_task_returns_a_coroutine() -> None:
    ctx = TaskTestContext()
    outcome = count_down(ctx, 3)
    assert inspect.iscoroutine(outcome)
    assert (await outcome)["start"] == 3
    assert [p["done"] for p in ctx.progress] == [1, 2, 3]
    assert ctx.progress[-1]["percent"] == 100.0


async def test_db_task_returns_a_coroutine() -> None:
    outcome = my_db_task(TaskTestContext(), entity_id="e1")
    assert inspect.iscoroutine(outcome)
    assert (await outcome)["entity_id"] == "e1"


def test_calling_without_a_context_keeps_celerys_behaviour() -> None:
    # Celery's ``task(...)`` runs the task in this process, through the
    # worker-side path: a context of its own, none of the test's recording.
    assert shout("hello") == {"status": "success", "task_id": "", "text": "HELLO"}


def test_a_plain_task_context_runs_the_body_too() -> None:
    ctx = TaskContext(task_id="plain", task_name="plain.ctx")
    assert shout(ctx, "a") == {"status": "success", "task_id": "plain", "text": "A"}


def test_errors_propagate_to_the_test() -> None:
    ctx = TaskTestContext()
    with pytest.raises(TaskValidationError, match="text is empty"):
        shout(ctx, "")
    ctx.assert_logged("warning", contains="Nothing")


# -- defaults -------------------------------------------------------------------


def test_defaults_and_task_identity() -> None:
    ctx = TaskTestContext()
    assert (ctx.task_id, ctx.task_name, ctx.attempt, ctx.queue) == (
        "test-task-id",
        "test.task",
        0,
        "default",
    )
    assert not ctx.has_session
    shout(ctx, "x")
    # Name and queue default to the task's own once it runs.
    assert ctx.task_name == "tests.testing.shout"
    assert ctx.recorder.fields["task_name"] == "tests.testing.shout"


async def test_queue_defaults_to_the_tasks_own() -> None:
    ctx = TaskTestContext()
    await write_in_batches(ctx, prefix="p", count=2)
    assert ctx.queue == "low_priority"
    # Two commits inside the task (commit, then commit_batch), then the task's own.
    assert ctx.session.transactions == ["commit", "commit", "commit"]  # type: ignore[attr-defined]


def test_given_identity_is_kept() -> None:
    ctx = TaskTestContext(task_id="t-1", task_name="mine", attempt=3, queue="high_priority")
    shout(ctx, "x")
    assert (ctx.task_id, ctx.task_name, ctx.attempt, ctx.queue) == (
        "t-1",
        "mine",
        3,
        "high_priority",
    )
    assert ctx.result["task_id"] == "t-1"


async def test_db_task_gets_a_mock_session_by_default() -> None:
    ctx = TaskTestContext()
    await my_db_task(ctx, entity_id="e1")
    assert isinstance(ctx.session, AsyncSession)
    ctx.session.assert_committed(times=1)  # type: ignore[attr-defined]


def test_simple_task_has_no_session_as_on_a_worker() -> None:
    with pytest.raises(TaskConfigurationError, match="only available in @db_task"):
        peek_session(TaskTestContext())


# -- records and results ----------------------------------------------------------


async def test_records_every_log_call_with_level_message_and_fields() -> None:
    ctx = TaskTestContext()
    ctx.log_debug("d", a=1)
    ctx.log_info("i")
    ctx.log_success("s", b="x")
    ctx.log_warning("w")
    ctx.log_error("e", code=5)
    assert ctx.records == [
        LoggedRecord("debug", "d", {"a": 1}),
        LoggedRecord("info", "i", {}),
        LoggedRecord("success", "s", {"b": "x"}),
        LoggedRecord("warning", "w", {}),
        LoggedRecord("error", "e", {"code": 5}),
    ]
    assert ctx.messages == ["d", "i", "s", "w", "e"]
    assert [r.message for r in ctx.logged("warning")] == ["w"]
    assert str(ctx.records[4]) == "ERROR   e code=5"


def test_records_every_result() -> None:
    ctx = TaskTestContext()
    first = shout(ctx, "a")
    second = shout(ctx, "b")
    assert ctx.results == [first, second]
    assert ctx.result is second


def test_result_without_one_fails_with_the_log() -> None:
    ctx = TaskTestContext()
    ctx.log_info("Started")
    with pytest.raises(AssertionError, match="no success_result") as raised:
        _ = ctx.result
    assert "INFO    Started" in str(raised.value)


# -- assertions pass when they should... -------------------------------------------


def test_assertions_pass_and_return_the_record() -> None:
    ctx = TaskTestContext()
    shout(ctx, "hey")
    record = ctx.assert_logged("info", contains="Shouting", length=3)
    assert record.fields == {"length": 3}
    ctx.assert_logged("INFO")
    ctx.assert_not_logged("success", contains="Whisper")
    ctx.assert_not_logged("warning")
    ctx.assert_not_logged("info", contains="Whisper")
    ctx.assert_no_errors()


# -- ...and fail loudly, with the recorded log, when they should ----------------------


def _shouted() -> TaskTestContext:
    ctx = TaskTestContext()
    shout(ctx, "hey")
    return ctx


def test_assert_logged_success_fails_and_shows_the_log() -> None:
    ctx = TaskTestContext()
    with pytest.raises(TaskValidationError):
        shout(ctx, "")
    with pytest.raises(AssertionError) as raised:
        ctx.assert_logged_success()
    message = str(raised.value)
    assert "expected a 'success' record" in message
    assert "WARNING Nothing to shout" in message
    assert "ERROR   Task failed" in message


def test_assert_logged_success_with_text_fails_and_shows_the_log() -> None:
    ctx = _shouted()
    with pytest.raises(AssertionError) as raised:
        ctx.assert_logged_success("Lift-off")
    message = str(raised.value)
    assert "expected a 'success' record containing 'Lift-off'" in message
    assert "INFO    Shouting length=3" in message
    assert "SUCCESS Task succeeded" in message


def test_assert_logged_success_fails_on_an_empty_log() -> None:
    with pytest.raises(AssertionError, match=r"\(nothing\)"):
        TaskTestContext().assert_logged_success()


@pytest.mark.parametrize(
    ("contains", "fields", "expected"),
    [
        ("Whisper", {}, "containing 'Whisper'"),
        ("Shouting", {"length": 4}, "with {'length': 4}"),
        (None, {"volume": 11}, "with {'volume': 11}"),
    ],
)
def test_assert_logged_fails_on_text_or_fields(
    contains: str | None, fields: dict[str, int], expected: str
) -> None:
    ctx = _shouted()
    with pytest.raises(AssertionError) as raised:
        ctx.assert_logged("info", contains, **fields)
    assert expected in str(raised.value)
    assert "Shouting length=3" in str(raised.value)


def test_assert_not_logged_and_no_errors_fail_and_show_the_log() -> None:
    ctx = TaskTestContext()
    ctx.log_info("Before")
    ctx.log_error("Boom", code=7)
    with pytest.raises(AssertionError) as raised:
        ctx.assert_no_errors()
    assert "expected no 'error' record, found 1" in str(raised.value)
    assert "INFO    Before" in str(raised.value)
    assert "ERROR   Boom code=7" in str(raised.value)
    with pytest.raises(AssertionError, match="containing 'Boo'"):
        ctx.assert_not_logged("error", contains="Boo")


def test_an_unknown_level_is_a_mistake_not_a_pass() -> None:
    ctx = _shouted()
    with pytest.raises(ValueError, match="unknown log level 'warn'"):
        ctx.assert_not_logged("warn")
    with pytest.raises(ValueError, match="unknown log level"):
        ctx.assert_logged("fatal")


# -- mock_task_session ---------------------------------------------------------------


async def test_failing_db_task_rolls_back_and_never_commits() -> None:
    session = mock_task_session()
    ctx = TaskTestContext(session=session)
    with pytest.raises(TaskValidationError, match="refusing after the write"):
        await write_then_fail(ctx, key="k1")
    assert (session.commits, session.rollbacks) == (0, 1)
    assert session.transactions == ["rollback"]
    session.assert_rolled_back()
    assert [record.key for record in session.added] == ["k1"]
    session.flush.assert_awaited_once()
    ctx.assert_logged("error", contains="Giving up", key="k1")


async def test_successful_db_task_commits_once() -> None:
    session = mock_task_session()
    await my_db_task(TaskTestContext(session=session), entity_id="e")
    assert session.transactions == ["commit"]
    session.assert_committed()


async def test_session_assertions_fail_when_they_should() -> None:
    committed = mock_task_session()
    await my_db_task(TaskTestContext(session=committed), entity_id="e")
    with pytest.raises(AssertionError, match=r"expected a rollback last; .*\['commit'\]"):
        committed.assert_rolled_back()
    with pytest.raises(AssertionError, match="expected commit 2 time"):
        committed.assert_committed(times=2)

    rolled_back = mock_task_session()
    with pytest.raises(TaskValidationError):
        await write_then_fail(TaskTestContext(session=rolled_back), key="k")
    with pytest.raises(AssertionError, match=r"0 commit.*1 rollback"):
        rolled_back.assert_committed()


async def test_mock_session_awaitables_and_sync_methods() -> None:
    session = mock_task_session()
    assert isinstance(session, AsyncSession)
    for name in ("execute", "get", "flush", "commit", "rollback", "refresh", "scalar", "scalars"):
        coroutine = getattr(session, name)()
        assert inspect.iscoroutine(coroutine), name
        await coroutine
    await session.delete("x")
    assert session.deleted == ["x"]
    session.add("a")
    session.add_all(["b", "c"])
    assert session.added == ["a", "b", "c"]
    session.expunge_all()  # sync, as on AsyncSession
    with pytest.raises(AttributeError):
        session.no_such_method  # noqa: B018


async def test_mock_session_results_are_empty_by_default_and_configurable() -> None:
    session = mock_task_session()
    result = await session.execute(select(Record))
    assert result.scalars().all() == []
    assert result.scalar_one_or_none() is None
    assert await session.get(Record, "x") is None
    assert (await session.scalars(select(Record))).all() == []
    row = Record(key="r")
    session.execute.return_value.scalars.return_value.all.return_value = [row]
    assert (await session.execute(select(Record))).scalars().all() == [row]


async def test_mock_session_finds_given_entities_by_id() -> None:
    class Thing:
        def __init__(self) -> None:
            self.id = uuid.uuid4()

    thing = Thing()
    session = mock_task_session([thing])
    assert await session.get(Thing, thing.id) is thing
    assert await session.get(Thing, str(thing.id)) is thing
    assert await session.get(Thing, uuid.uuid4()) is None


# -- the pytest plugin ---------------------------------------------------------------


def test_plugin_is_registered_and_imports_nothing_costly() -> None:
    (plugin,) = [e for e in entry_points(group="pytest11") if e.name == "background_tasks"]
    assert plugin.value == "app.core.background_pytest"
    # Loaded before any conftest: it must not read the settings, build the
    # Celery app or touch SQLAlchemy until a fixture is used.
    code = (
        "import sys, app.core.background_pytest; "
        "print(sorted(m for m in sys.modules if m.startswith(('app.', 'celery', 'sqlalchemy'))))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert loaded.strip() == "['app.core', 'app.core.background_pytest']"
