"""The framework end to end: a real prefork worker, Redis broker, PostgreSQL database."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import pytest
from celery.exceptions import WorkerLostError
from celery.result import AsyncResult

from app.core.background import TaskArgumentError, TaskNotFoundError, TaskValidationError
from tests.support import tasks
from tests.support.db import fetchval
from tests.support.publishes import recorded_publishes
from tests.support.services import Services

pytestmark = pytest.mark.usefixtures("worker")

RESULT_TIMEOUT = 60


def key() -> str:
    return uuid.uuid4().hex


def executions(stack: Services, name: str) -> int:
    value = stack.redis().get(f"executions:{name}")
    return int(value or 0)


def wait_failure(result: AsyncResult[Any]) -> BaseException:
    with pytest.raises(Exception) as raised:  # noqa: PT011 - callers check the type
        result.get(timeout=RESULT_TIMEOUT)
    return raised.value


def test_db_task_commits_on_success_seen_from_another_connection(stack: Services) -> None:
    k = key()
    result = tasks.record.delay(key=k)
    assert result.get(timeout=RESULT_TIMEOUT) == {
        "status": "success",
        "task_id": result.id,
        "key": k,
    }
    assert fetchval(stack, "SELECT count(*) FROM test_records WHERE key = $1", k) == 1


def test_db_task_rolls_back_a_written_row_on_error(stack: Services) -> None:
    k = key()
    error = wait_failure(tasks.record_then_fail.delay(key=k))
    assert isinstance(error, TaskValidationError)
    assert fetchval(stack, "SELECT count(*) FROM test_records WHERE key = $1", k) == 0
    assert executions(stack, k) == 1


@pytest.mark.parametrize(
    ("task", "error_type"),
    [(tasks.fail_validation, TaskValidationError), (tasks.fail_not_found, TaskNotFoundError)],
)
def test_non_retriable_error_runs_exactly_once(
    stack: Services, task: Any, error_type: type
) -> None:
    k = key()
    result = task.delay(key=k)
    error = wait_failure(result)
    assert isinstance(error, error_type)
    assert "key=" in str(error)
    assert executions(stack, k) == 1
    assert result.state == "FAILURE"


def stored_error(stack: Services, task_id: str) -> dict[str, Any]:
    """The failure as the result backend holds it (type, module, message)."""
    meta = json.loads(stack.redis().get(f"celery-task-meta-{task_id}") or b"{}")
    assert meta["status"] == "FAILURE"
    return dict(meta["result"])


def test_integrity_error_is_not_retried(stack: Services) -> None:
    k = key()
    result = tasks.duplicate_key.delay(key=k)
    wait_failure(result)
    stored = stored_error(stack, result.id)
    assert (stored["exc_module"], stored["exc_type"]) == ("sqlalchemy.exc", "IntegrityError")
    assert "duplicate key" in str(stored["exc_message"])
    assert executions(stack, k) == 1


def json_lines(log: str) -> list[dict[str, Any]]:
    """The worker's JSON log lines (LOG_FORMAT=json), parsed."""
    return [json.loads(line) for line in log.splitlines() if line.startswith("{")]


@pytest.mark.parametrize("error", ["RuntimeError", "TimeoutError", "asyncio.TimeoutError"])
def test_retriable_error_is_retried_by_policy_then_fails_with_original_error(
    stack: Services, worker: Any, error: str
) -> None:
    k = key()
    result = tasks.always_fails.delay(key=k, error=error)
    failure = wait_failure(result)
    # standard policy: 1 run + 3 retries; the original type and message in the backend.
    assert executions(stack, k) == 4
    assert type(failure).__name__ == error.rsplit(".", 1)[-1]
    assert "attempt 3 failed" in str(failure)
    # The framework said so: three retries, then one final failure, retries exhausted.
    lines = [line for line in json_lines(worker.log()) if line.get("task_id") == result.id]
    retries = [line for line in lines if line["event"] == "Task failed, will retry"]
    finals = [line for line in lines if line["event"] == "Task failed"]
    assert [line["attempt"] for line in retries] == [0, 1, 2]
    assert [(line["attempt"], line["reason"]) for line in finals] == [(3, "retries exhausted")]


def test_retried_task_succeeds_when_error_goes_away(stack: Services) -> None:
    k = key()
    result = tasks.fails_until.delay(key=k, succeed_on=2)
    assert result.get(timeout=RESULT_TIMEOUT)["attempt"] == 2
    assert executions(stack, k) == 3


def test_terminated_postgres_backend_is_retried(stack: Services) -> None:
    k = key()
    result = tasks.terminated_backend.delay(key=k)
    assert result.get(timeout=RESULT_TIMEOUT)["attempt"] == 1
    assert executions(stack, k) == 2
    assert fetchval(stack, "SELECT attempt FROM test_records WHERE key = $1", k) == 1


def test_real_deadlock_is_retried(stack: Services, worker: Any) -> None:
    k = key()
    result = tasks.deadlock.delay(key=k, dsn=stack.postgres_dsn)
    assert result.get(timeout=RESULT_TIMEOUT)["attempt"] == 1
    assert executions(stack, k) == 2
    retries = [
        line
        for line in worker.log().splitlines()
        if result.id in line and "will retry" in line and "deadlock detected" in line
    ]
    assert len(retries) == 1, "the first attempt must fail on the deadlock itself"
    assert '"error_type": "DBAPIError"' in retries[0]


def test_each_queue_routes_to_itself() -> None:
    assert tasks.where_am_i.delay().get(timeout=RESULT_TIMEOUT) == "default"
    assert tasks.urgent.delay().get(timeout=RESULT_TIMEOUT) == "high_priority"
    assert tasks.later.delay().get(timeout=RESULT_TIMEOUT) == "low_priority"


def test_apply_async_with_task_id_and_args() -> None:
    task_id = f"custom-{key()}"
    result = tasks.echo.apply_async(kwargs={"a": 1, "b": [1, 2]}, task_id=task_id)
    assert result.id == task_id
    assert result.get(timeout=RESULT_TIMEOUT) == {
        "status": "success",
        "task_id": task_id,
        "a": 1,
        "b": [1, 2],
    }


def test_success_result_keeps_callers_status_under_result_status() -> None:
    result = tasks.echo.delay(status="created", task_id="mine")
    assert result.get(timeout=RESULT_TIMEOUT) == {
        "status": "success",
        "task_id": result.id,
        "result_status": "created",
        "result_task_id": "mine",
    }


def test_non_json_argument_fails_at_delay_and_sends_nothing(stack: Services) -> None:
    with recorded_publishes() as published:
        with pytest.raises(TaskArgumentError, match=r"tests\.echo: arguments must be JSON"):
            tasks.echo.delay(value=object())
        assert published == []
        tasks.echo.delay(value=1)  # the control: a valid call is seen
    assert published == ["tests.echo"]


def test_missing_argument_fails_at_delay_naming_the_task() -> None:
    with pytest.raises(TaskArgumentError, match=r"tests\.record: missing a required argument"):
        tasks.record.delay()


def test_message_with_missing_arguments_fails_without_retry(stack: Services) -> None:
    # Bypass the client-side check, as a foreign producer would.
    from app.core.background import celery_app

    result = celery_app.send_task("tests.record", kwargs={})
    error = wait_failure(result)
    assert isinstance(error, TaskValidationError)
    assert "missing a required argument" in str(error)


def test_soft_time_limit_cancels_an_awaiting_db_task_and_the_next_runs(stack: Services) -> None:
    error = wait_failure(tasks.sleep_in_db.delay(seconds=10))
    assert type(error).__name__ == "SoftTimeLimitExceeded"
    # The same worker children keep serving db tasks on their loop and pool.
    keys = [key() for _ in range(6)]
    results = [tasks.record.delay(key=k) for k in keys]
    for result in results:
        result.get(timeout=RESULT_TIMEOUT)
    assert fetchval(stack, "SELECT count(*) FROM test_records WHERE key = ANY($1)", keys) == 6


def test_sync_task_soft_time_limit_from_decorator_options() -> None:
    error = wait_failure(tasks.sleep_sync.delay(seconds=10))
    assert type(error).__name__ == "SoftTimeLimitExceeded"


def test_worker_death_is_retried_boundedly(stack: Services) -> None:
    k = key()
    error = wait_failure(tasks.kill_own_process.delay(key=k))
    assert isinstance(error, WorkerLostError)
    # standard policy: the first run and 3 retries, then a final failure.
    assert executions(stack, k) == 4


def test_worker_death_once_then_success(stack: Services) -> None:
    k = key()
    result = tasks.kill_own_process.delay(key=k, survive_on=1)
    assert result.get(timeout=RESULT_TIMEOUT)["attempt"] == 1
    assert executions(stack, k) == 2


def test_a_thousand_db_tasks_through_prefork(stack: Services, worker: Any) -> None:
    prefix = key()
    keys = [f"{prefix}-{i}" for i in range(1000)]
    results = [tasks.record.delay(key=k) for k in keys]
    for result in results:
        result.get(timeout=RESULT_TIMEOUT)
    count = fetchval(stack, "SELECT count(*) FROM test_records WHERE key LIKE $1", f"{prefix}-%")
    assert count == 1000
    # Both pool children served them, each with its own loop and connections.
    pids = fetchval(
        stack,
        "SELECT count(DISTINCT worker_pid) FROM test_records WHERE key LIKE $1",
        f"{prefix}-%",
    )
    assert pids == 2
    log = worker.log()
    for trap in ("attached to a different loop", "another operation is in progress"):
        assert trap not in log


def test_progress_of_an_async_retry_is_stored_with_its_attempt(stack: Services) -> None:
    # The body runs on the loop thread, where Celery's request is empty: the
    # PROGRESS state must still carry this run's request (attempt 1).
    from app.core.background import celery_app
    from app.core.background.fastapi import get_task_status

    k = key()
    result = tasks.progress_after_retry.delay(key=k)
    deadline = time.monotonic() + RESULT_TIMEOUT
    while result.state != "PROGRESS" and time.monotonic() < deadline:
        time.sleep(0.05)
    status = get_task_status(celery_app, result.id)
    assert (status.state, status.attempt) == ("progress", 1)
    assert status.progress == {"done": 1, "total": 2, "percent": 50.0}
    stack.redis().set(f"release:{k}", 1)
    assert result.get(timeout=RESULT_TIMEOUT)["attempt"] == 1


@pytest.mark.parametrize("task", [tasks.record_then_return_unstorable, tasks.return_unstorable])
def test_a_result_that_cannot_be_stored_fails_once_before_any_success(
    stack: Services, worker: Any, task: Any
) -> None:
    """No "Task succeeded" then an EncodeError: a non-retriable failure, nothing committed."""
    k = key()
    result = task.delay(key=k)
    error = wait_failure(result)
    assert type(error).__name__ == "TaskResultError"
    assert "cannot be stored as JSON" in str(error)
    assert executions(stack, k) == 1
    assert fetchval(stack, "SELECT count(*) FROM test_records WHERE key = $1", k) == 0
    lines = [line for line in json_lines(worker.log()) if line.get("task_id") == result.id]
    assert "Task succeeded" not in [line["event"] for line in lines]
    (failed,) = [line for line in lines if line["event"] == "Task failed"]
    assert failed["reason"] == "non-retriable"
