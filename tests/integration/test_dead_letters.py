"""Dead letters and replay on a real worker (Redis broker, PostgreSQL database).

The session's prefork worker runs the tasks; each final failure must leave one
row in ``background_dead_letters`` (read back through the store the API and
the CLI use), and a replay must send the task again through its send path,
once, however often it is asked.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from celery.result import AsyncResult
from sqlalchemy.ext.asyncio import AsyncEngine

from app.core.background import celery_app
from app.core.background.internals.console.replay import replay, replay_where
from app.core.background.internals.delivery.dedup import deduplicator
from app.core.background.internals.operations.dead_letters import (
    DeadLetter,
    DeadLetterFilter,
    DeadLetterStore,
    encode_arguments,
)
from app.core.background.internals.operations.worker_process import WorkerProcess
from tests.conftest import TEST_TASK_MODULES, PrivateBroker
from tests.support import tasks, tasks_operations
from tests.support.dead_letters import WAIT, letter_of, run
from tests.support.services import Services
from tests.support.tasks_operations import blocked_key

pytestmark = pytest.mark.usefixtures("worker")


def failed(result: AsyncResult[Any]) -> None:
    with pytest.raises(Exception):  # noqa: B017, PT011 - the dead letter says what it was
        result.get(timeout=WAIT)


@pytest.fixture
def blocked(stack: Services) -> Iterator[str]:
    key = uuid.uuid4().hex
    stack.redis().set(blocked_key(key), 1)
    yield key
    stack.redis().delete(blocked_key(key))


def test_retries_exhausted_keep_the_arguments_attempts_and_both_failure_times(
    stack: Services,
) -> None:
    key = uuid.uuid4().hex
    result = tasks_operations.flaky.delay(key=key)
    failed(result)
    letter = letter_of(stack, result.id)
    assert letter.task_name == "tests.ops.flaky"
    assert letter.reason == "retries exhausted"
    assert letter.attempts == 4  # the standard policy: 3 retries
    assert letter.error_type == "ConnectionError"
    assert letter.error_module == "builtins"
    assert letter.error_message == f"attempt 3 of {key} failed"
    assert letter.traceback is not None
    assert "ConnectionError" in letter.traceback
    assert letter.call() == ([], {"key": key})
    assert letter.arguments_complete
    assert letter.queue == "default"
    assert letter.worker is not None
    assert "@" in letter.worker
    # The first attempt failed well before the last (three retry delays apart).
    assert letter.first_failed_at < letter.last_failed_at
    assert letter.replayed_as is None


def test_a_non_retriable_error_is_a_dead_letter_after_one_attempt(
    stack: Services, blocked: str
) -> None:
    result = tasks_operations.fails_while_blocked.delay(key=blocked, payload={"n": [1, 2]})
    failed(result)
    letter = letter_of(stack, result.id)
    assert (letter.reason, letter.attempts) == ("non-retriable", 1)
    assert letter.error_type == "NonRetriableTaskError"
    assert letter.call() == ([], {"key": blocked, "payload": {"n": [1, 2]}})
    assert letter.first_failed_at == letter.last_failed_at


def test_a_run_over_its_time_limit_is_a_dead_letter(stack: Services) -> None:
    key = uuid.uuid4().hex
    result = tasks_operations.write_then_wait.apply_async(
        kwargs={"key": key, "seconds": 30.0}, soft_time_limit=1, time_limit=10
    )
    failed(result)
    letter = letter_of(stack, result.id)
    assert (letter.reason, letter.error_type) == ("time limit", "SoftTimeLimitExceeded")
    assert letter.call() == ([], {"key": key, "seconds": 30.0})


def test_a_run_killed_at_its_hard_time_limit_is_a_dead_letter_with_its_worker(
    stack: Services,
) -> None:
    """Reported by the worker's main process, after Celery has let go of the request."""
    result = tasks_operations.ignores_soft_limit.apply_async(
        kwargs={"seconds": 10}, time_limit=2, soft_time_limit=1
    )
    failed(result)
    letter = letter_of(stack, result.id)
    assert (letter.reason, letter.error_type) == ("time limit", "TimeLimitExceeded")
    assert letter.worker is not None
    assert "@" in letter.worker  # the Celery node name, as stored with the failure
    assert letter.queue == "default"
    assert letter.call() == ([], {"seconds": 10})


def test_a_call_that_does_not_fit_the_signature_is_refused(stack: Services) -> None:
    result = celery_app.send_task("tests.record", kwargs={"not_a_parameter": 1})
    failed(result)
    letter = letter_of(stack, result.id)
    assert letter.reason == "refused"
    assert letter.error_type == "TaskArgumentsRefusedError"
    assert letter.call() == ([], {"not_a_parameter": 1})


def test_an_unknown_task_name_is_refused_and_kept(stack: Services) -> None:
    result = celery_app.send_task("tests.no_such_task", args=[1, "two"])
    letter = letter_of(stack, result.id)
    assert (letter.task_name, letter.reason) == ("tests.no_such_task", "refused")
    assert letter.call() == ([1, "two"], {})


def test_replay_sends_the_task_again_once_and_links_the_new_id(
    stack: Services, blocked: str
) -> None:
    result = tasks_operations.fails_while_blocked.delay(key=blocked)
    failed(result)
    letter_of(stack, result.id)
    stack.redis().delete(blocked_key(blocked))  # the cause is fixed

    async def two_replays_at_once(engine: AsyncEngine) -> list[Any]:
        # A double click: two replays of the same dead letter race.
        first, second = DeadLetterStore(engine), DeadLetterStore(engine)
        return list(
            await asyncio.gather(
                replay(first, celery_app, result.id), replay(second, celery_app, result.id)
            )
        )

    outcomes = run(two_replays_at_once, stack)
    sent = [outcome for outcome in outcomes if outcome.sent]
    assert len(sent) == 1, outcomes
    assert [o.refused for o in outcomes if not o.sent] == ["already replayed"]
    new_id = sent[0].replayed_as
    assert new_id is not None
    assert new_id != result.id
    assert AsyncResult(new_id, app=celery_app).get(timeout=WAIT)["key"] == blocked
    assert letter_of(stack, result.id).replayed_as == new_id
    assert tasks.count(blocked) == 3  # the failed run, the replay, and this count
    # Asked again later: nothing is sent.
    again = run(lambda engine: replay(DeadLetterStore(engine), celery_app, result.id), stack)
    assert (again.sent, again.refused) == (False, "already replayed")


def test_replay_of_a_group_sends_each_pending_one(stack: Services) -> None:
    keys = [uuid.uuid4().hex for _ in range(3)]
    for key in keys:
        stack.redis().set(blocked_key(key), 1)
    results = [tasks_operations.fails_while_blocked.delay(key=key) for key in keys]
    for result in results:
        failed(result)
        letter_of(stack, result.id)
    for key in keys:
        stack.redis().delete(blocked_key(key))
    since = min(letter_of(stack, r.id).last_failed_at for r in results)
    where = DeadLetterFilter(
        task_name="tests.ops.fails_while_blocked", error_type="NonRetriableTaskError", since=since
    )
    summary = run(lambda engine: replay_where(DeadLetterStore(engine), celery_app, where), stack)
    assert summary.sent >= 3  # and any other pending one of this group since then
    replayed = {letter_of(stack, r.id).replayed_as for r in results}
    assert None not in replayed
    for new_id in replayed:
        assert AsyncResult(new_id, app=celery_app).get(timeout=WAIT)["status"] == "success"


def test_a_replay_waits_while_a_task_with_the_same_deduplication_id_runs(
    stack: Services,
) -> None:
    """The failed task's id was a deduplication key: a replay is refused while that id is busy."""
    task_id = f"notify-{uuid.uuid4()}"
    key = uuid.uuid4().hex
    arguments, complete = encode_arguments([], {"key": key})
    now = time.time()
    letter = DeadLetter(
        task_id=task_id, task_name="tests.ops.fails_while_blocked", queue="default",
        reason="non-retriable", arguments=arguments, arguments_complete=complete,
        error_type="NonRetriableTaskError", error_module="app.core.background",
        error_message="blocked", traceback=None, attempts=1, worker="w@h",
        first_failed_at=now, last_failed_at=now,
    )  # fmt: skip
    run(lambda engine: DeadLetterStore(engine).record(letter), stack)
    # The application sends that key again: it runs for 3 s and holds the id.
    busy = tasks_operations.write_then_wait.apply_async(
        kwargs={"key": key, "seconds": 3.0}, task_id=task_id
    )
    refused = run(lambda engine: replay(DeadLetterStore(engine), celery_app, task_id), stack)
    assert (refused.sent, refused.refused) == (False, "deduplicated"), refused
    assert letter_of(stack, task_id).replayed_as is None
    assert busy.get(timeout=WAIT)["status"] == "success"
    # Once it has ended (the worker frees the id just after it stores the
    # result), the replay is sent.
    deadline = time.monotonic() + WAIT
    while deduplicator.store.holder(task_id) is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    sent = run(lambda engine: replay(DeadLetterStore(engine), celery_app, task_id), stack)
    assert sent.sent, sent
    assert AsyncResult(sent.replayed_as, app=celery_app).get(timeout=WAIT)["key"] == key


def test_a_task_name_no_longer_registered_is_refused_and_the_row_kept(stack: Services) -> None:
    task_id = f"gone-{uuid.uuid4()}"
    arguments, complete = encode_arguments([1], {})
    now = time.time()
    letter = DeadLetter(
        task_id=task_id, task_name="tests.renamed_long_ago", queue="default",
        reason="non-retriable", arguments=arguments, arguments_complete=complete,
        error_type="RuntimeError", error_module="builtins", error_message="boom",
        traceback=None, attempts=1, worker="w@h",
        first_failed_at=now, last_failed_at=now,
    )  # fmt: skip
    run(lambda engine: DeadLetterStore(engine).record(letter), stack)
    outcome = run(lambda engine: replay(DeadLetterStore(engine), celery_app, task_id), stack)
    assert outcome.refused == "not replayable"
    assert outcome.reason is not None
    assert "tests.renamed_long_ago" in outcome.reason
    assert letter_of(stack, task_id).replayed_as is None


def test_huge_arguments_are_kept_cut_and_not_replayed(stack: Services, blocked: str) -> None:
    payload = "x" * 1_200_000
    result = tasks_operations.fails_while_blocked.delay(key=blocked, payload=payload)
    failed(result)
    letter = letter_of(stack, result.id)
    assert not letter.arguments_complete
    assert 1_000_000 <= len(letter.arguments) < 1_100_000
    outcome = run(lambda engine: replay(DeadLetterStore(engine), celery_app, result.id), stack)
    assert outcome.refused == "not replayable"


# The CLI imports the app's task modules itself; a replay names the tests' modules.
INCLUDE = ("--include", "tests.support.tasks_operations")


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app.core.background", "dead-letters", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_cli_shows_replays_and_purges(stack: Services, blocked: str) -> None:
    result = tasks_operations.fails_while_blocked.delay(key=blocked, payload="s3cret-ish")
    failed(result)
    letter_of(stack, result.id)
    shown = cli("show", result.id)
    assert shown.returncode == 0, shown.stderr
    assert f"{blocked} is blocked" in shown.stdout  # the error message
    assert json.dumps(blocked) in shown.stdout  # the arguments
    assert "s3cret-ish" in shown.stdout
    listed = cli("list", "--task", "tests.ops.fails_while_blocked")
    assert result.id in listed.stdout
    assert cli("show", "no-such-id").returncode == 1
    stack.redis().delete(blocked_key(blocked))
    unregistered = cli("replay", result.id)  # its module is not one of the app's
    assert unregistered.returncode == 1
    assert "no task named 'tests.ops.fails_while_blocked'" in unregistered.stdout
    replayed = cli("replay", result.id, *INCLUDE)
    assert replayed.returncode == 0, replayed.stdout + replayed.stderr
    new_id = letter_of(stack, result.id).replayed_as
    assert new_id is not None
    assert new_id in replayed.stdout
    assert AsyncResult(new_id, app=celery_app).get(timeout=WAIT)["status"] == "success"
    again = cli("replay", result.id, *INCLUDE)
    assert again.returncode == 1
    assert "already replayed" in again.stdout
    assert cli("replay", "no-such-id").returncode == 1
    purged = cli("purge", result.id)
    assert (purged.returncode, purged.stdout.strip()) == (0, "deleted 1 dead letter(s)")
    assert cli("show", result.id).returncode == 1


def test_old_dead_letters_are_pruned_by_the_periodic_task(stack: Services) -> None:
    from app.core.background.tasks import prune_dead_letters

    old_id, new_id = f"old-{uuid.uuid4()}", f"new-{uuid.uuid4()}"
    arguments, _ = encode_arguments([], {})
    for task_id, age in ((old_id, 31 * 86400), (new_id, 29 * 86400)):
        when = time.time() - age
        letter = DeadLetter(
            task_id=task_id, task_name="tests.ops.flaky", queue="default", reason="refused",
            arguments=arguments, arguments_complete=True, error_type="E", error_module=None,
            error_message="", traceback=None, attempts=1, worker=None,
            first_failed_at=when, last_failed_at=when,
        )  # fmt: skip
        run(lambda engine, letter=letter: DeadLetterStore(engine).record(letter), stack)
    outcome = prune_dead_letters.delay().get(timeout=WAIT)
    assert outcome["deleted"] >= 1
    assert run(lambda engine: DeadLetterStore(engine).get(old_id), stack) is None
    assert run(lambda engine: DeadLetterStore(engine).get(new_id), stack) is not None


def test_a_dead_letter_that_cannot_be_written_is_logged_and_the_outcome_stands(
    private_broker: PrivateBroker,
) -> None:
    """The worker's database refuses connections: the failure is still a FAILURE, once."""
    unreachable = "postgresql+asyncpg://postgres@127.0.0.1:1/unreachable"
    env = {**private_broker.env, "DATABASE_URL": unreachable}
    app = private_broker.app
    key = uuid.uuid4().hex
    counter = app.connection_for_write().default_channel.client
    counter.set(blocked_key(key), 1)
    with WorkerProcess(env, include=TEST_TASK_MODULES) as worker:
        failing = app.send_task("tests.ops.fails_while_blocked", kwargs={"key": key})
        with pytest.raises(Exception) as raised:  # noqa: PT011 - the type is asserted below
            failing.get(timeout=WAIT)
        assert type(raised.value).__name__ == "NonRetriableTaskError"
        line = (
            f"Could not record the dead letter of task {failing.id} (tests.ops.fails_while_blocked)"
        )
        deadline = time.monotonic() + WAIT
        while line not in worker.log() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert line in worker.log()
        counter.delete(blocked_key(key))
        after = app.send_task("tests.ops.fails_while_blocked", kwargs={"key": key})
        assert after.get(timeout=WAIT)["status"] == "success"  # the worker goes on
    assert failing.state == "FAILURE"
    assert int(counter.get(f"executions:{key}")) == 2  # the failed run was not run again


def test_the_same_id_failing_again_after_a_replay_is_a_new_failure_to_replay(
    stack: Services,
) -> None:
    task_id = f"notify-{uuid.uuid4()}"
    arguments, complete = encode_arguments([], {"key": "k"})

    def letter(at: float) -> DeadLetter:
        return DeadLetter(
            task_id=task_id, task_name="tests.ops.fails_while_blocked", queue="default",
            reason="non-retriable", arguments=arguments, arguments_complete=complete,
            error_type="NonRetriableTaskError", error_module=None, error_message=f"at {at}",
            traceback=None, attempts=1, worker="w@h", first_failed_at=at, last_failed_at=at,
        )  # fmt: skip

    async def fail_replay_fail(engine: AsyncEngine) -> DeadLetter | None:
        store = DeadLetterStore(engine)
        await store.record(letter(1000.0))
        async with engine.begin() as connection:
            assert await store.mark_replayed(connection, task_id, "replayed-id", 1001.0)
        await store.record(letter(2000.0))
        return await store.get(task_id)

    again = run(fail_replay_fail, stack)
    assert again is not None
    assert (again.replayed_as, again.replayed_at) == (None, None)
    assert (again.first_failed_at, again.last_failed_at) == (1000.0, 2000.0)
    pending = run(
        lambda engine: DeadLetterStore(engine).task_ids(DeadLetterFilter(pending=True)), stack
    )
    assert task_id in pending
