"""Deduplication by task_id and periodic tasks, against real workers and brokers.

Executions are counted as rows in PostgreSQL (``test_records``). Three lease
backends: Redis (the session worker), and the database backend on SQLite and
on PostgreSQL (a private worker on a Redis database of its own, so that the
session worker, which uses the Redis backend, never takes their messages).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from celery.exceptions import WorkerLostError
from kombu import Connection

from app.core.background import TaskIdRevokedError, TaskValidationError, celery_app
from app.core.background.internals.delivery import dedup
from app.core.background.internals.delivery.dedup import deduplicator
from app.core.background.internals.delivery.lease_stores import (
    REVOKED,
    DatabaseLeaseStore,
    LeaseStore,
    RedisLeaseStore,
)
from app.core.background.internals.delivery.publish import Message, publish
from app.core.background.internals.logging import FRAMEWORK_LOGGER_NAME
from app.core.background.internals.operations.worker_process import WorkerProcess
from app.core.background.internals.registry import (
    KEEP_UNTIL_HEADER,
    PERIOD_HEADER,
    TOKEN_HEADER,
    TTL_HEADER,
)
from tests.support import tasks_dedup
from tests.support.db import fetchval
from tests.support.dedup_race import race
from tests.support.publishes import recorded_publishes
from tests.support.redis_server import RedisServer
from tests.support.services import Services, unavailable

RESULT_TIMEOUT = 60
DEDUP_TASKS = ["tests.support.tasks_dedup"]


def executions(stack: Services, key: str) -> int:
    return int(fetchval(stack, "SELECT count(*) FROM test_records WHERE key LIKE $1", f"{key}:%"))


def wait_for(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.1)


@dataclass
class Target:
    """Where a test sends: the lease store, the env of processes, the send options."""

    name: str
    store: LeaseStore
    env: dict[str, str]
    broker_url: str
    connection: Connection

    @property
    def options(self) -> dict[str, Any]:
        return {"producer": celery_app.amqp.Producer(self.connection, auto_declare=True)}

    def send(self, task: Any, *args: Any, task_id: str | None = None, **options: Any) -> Any:
        return task.apply_async(args, task_id=task_id, **self.options, **options)


@pytest.fixture(scope="module")
def private_redis(stack: Services) -> Iterator[RedisServer]:
    """A redis-server of this module's own: only this module's workers consume from it."""
    try:
        server = RedisServer().start()
    except (FileNotFoundError, RuntimeError) as exc:
        unavailable(str(exc))
    try:
        yield server
    finally:
        server.close()


@contextmanager
def started_target(name: str, broker_url: str, store: LeaseStore, **env: str) -> Iterator[Target]:
    env = {"CELERY_BROKER_URL": broker_url, **env}
    connection = Connection(broker_url)
    try:
        with WorkerProcess(env, include=DEDUP_TASKS):
            yield Target(name, store, env, broker_url, connection)
    finally:
        connection.release()


@pytest.fixture(scope="module")
def redis_target(private_redis: RedisServer) -> Iterator[Target]:
    url = private_redis.url(0)
    store = RedisLeaseStore(url)
    with started_target("redis", url, store, BACKGROUND_DEDUP_BACKEND="redis") as target:
        yield target


@pytest.fixture(scope="module", params=["redis", "sqlite", "postgres"])
def _target(
    request: pytest.FixtureRequest, stack: Services, private_redis: RedisServer
) -> Iterator[Target]:
    if request.param == "redis":
        yield request.getfixturevalue("redis_target")
        return
    if request.param == "sqlite":
        folder = Path(tempfile.mkdtemp(prefix="dedup-"))
        url, db = f"sqlite+aiosqlite:///{folder}/leases.db", 1
    else:
        url, db = stack.postgres_url, 2
    store = DatabaseLeaseStore(url)
    try:
        with started_target(
            request.param,
            private_redis.url(db),
            store,
            BACKGROUND_DEDUP_BACKEND="database",
            BACKGROUND_DEDUP_DATABASE_URL=url,
        ) as target:
            yield target
    finally:
        store.close()


@pytest.fixture
def target(_target: Target, monkeypatch: pytest.MonkeyPatch) -> Target:
    """The parametrized backend, used by this process's ``apply_async`` for the test."""
    monkeypatch.setattr(deduplicator, "_store", _target.store)
    return _target


@pytest.fixture
def redis_leases(redis_target: Target, monkeypatch: pytest.MonkeyPatch) -> Target:
    monkeypatch.setattr(deduplicator, "_store", redis_target.store)
    return redis_target


def new_key() -> str:
    return uuid.uuid4().hex


# -- the race ----------------------------------------------------------------


# Its own waits: racers 90 + result 60 + lease 30, plus joins = about 200 s.
@pytest.mark.timeout(300)
def test_parallel_callers_run_once(stack: Services, target: Target) -> None:
    """20 threads and 4 processes ask for the same id at once: one execution."""
    k = new_key()
    task_id = f"update-{k}"
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(24)
    out = context.Queue()
    racers = [context.Process(target=race, args=(target.env, task_id, k, barrier, 20, out))]
    racers += [
        context.Process(target=race, args=(target.env, task_id, k, barrier, 1, out))
        for _ in range(4)
    ]
    for process in racers:
        process.start()
    reports = [out.get(timeout=90) for _ in racers]
    for process in racers:
        process.join(30)
        assert process.exitcode == 0
    assert [given for ids, _ in reports for given in ids] == [task_id] * 24
    # One call of the 24 published; the others were deduplicated.
    assert sum(published for _, published in reports) == 1
    celery_app.AsyncResult(task_id).get(timeout=RESULT_TIMEOUT)
    wait_for(lambda: target.store.holder(task_id) is None)
    assert executions(stack, k) == 1


# -- the id is freed when the task ends --------------------------------------


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def framework_log() -> Iterator[Records]:
    handler = Records()
    logger = logging.getLogger(FRAMEWORK_LOGGER_NAME)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


def test_second_call_while_running_is_deduplicated_and_id_freed_after_success(
    stack: Services, target: Target, framework_log: Records
) -> None:
    k = new_key()
    task_id = f"notify-{k}"
    first = target.send(tasks_dedup.run, k, 1.0, task_id=task_id)
    wait_for(lambda: executions(stack, k) == 1)
    with recorded_publishes() as published:
        second = target.send(tasks_dedup.run, k, task_id=task_id)
    assert second.id == first.id == task_id
    assert published == []  # deduplicated: no second message
    logged = [r for r in framework_log.records if r.getMessage() == "Task deduplicated"]
    assert logged
    assert logged[0].fields["task_id"] == task_id  # type: ignore[attr-defined]
    assert first.get(timeout=RESULT_TIMEOUT) == task_id
    wait_for(lambda: target.store.holder(task_id) is None)
    assert executions(stack, k) == 1

    with recorded_publishes() as published:
        target.send(tasks_dedup.run, k, task_id=task_id)
    assert published == ["tests.dedup.run"]  # the id is free again: sent
    wait_for(lambda: executions(stack, k) == 2)
    wait_for(lambda: target.store.holder(task_id) is None)


def test_id_freed_after_failure(stack: Services, target: Target) -> None:
    k = new_key()
    task_id = f"update-{k}"
    result = target.send(tasks_dedup.fail, k, task_id=task_id)
    with pytest.raises(TaskValidationError):
        result.get(timeout=RESULT_TIMEOUT)
    wait_for(lambda: target.store.holder(task_id) is None)
    target.send(tasks_dedup.fail, k, task_id=task_id)
    wait_for(lambda: executions(stack, k) == 2)


def test_retrying_task_keeps_its_id_and_runs_once_per_attempt(
    stack: Services, target: Target
) -> None:
    """A retry is the same task: no duplicate, and a call while it waits is deduplicated."""
    k = new_key()
    task_id = f"update-{k}"
    result = target.send(tasks_dedup.retry_once, k, task_id=task_id)
    wait_for(lambda: executions(stack, k) == 1)
    wait_for(lambda: celery_app.AsyncResult(task_id).state == "RETRY")
    # The first attempt failed; the retry waits at least 3 s with the lease held.
    assert target.store.holder(task_id) not in (None, REVOKED)
    target.send(tasks_dedup.retry_once, k, task_id=task_id)
    assert result.get(timeout=RESULT_TIMEOUT) == 1
    wait_for(lambda: target.store.holder(task_id) is None)
    assert executions(stack, k) == 2


def test_a_retry_after_hint_delays_the_retry_at_least_that_long(
    stack: Services, redis_leases: Target
) -> None:
    """An error with ``retry_after`` (3 s; a ``CircuitBreakerOpen`` says when the breaker may
    close) is retried no sooner, although the policy's own delay here is 0.3 s."""
    k = new_key()
    result = redis_leases.send(tasks_dedup.retry_once, k)
    wait_for(lambda: executions(stack, k) == 1)
    first_seen = time.monotonic()  # within one poll (0.1 s) of the failure
    assert result.get(timeout=RESULT_TIMEOUT) == 1
    assert time.monotonic() - first_seen >= tasks_dedup.SlowDown.retry_after - 0.2


def test_a_rejected_and_requeued_message_keeps_its_lease_until_it_ends(
    stack: Services, redis_leases: Target
) -> None:
    """``Reject(requeue=True)``: the same message comes back, with the same lease."""
    k = new_key()
    task_id = f"update-{k}"
    result = redis_leases.send(tasks_dedup.reject_once, k, 2.0, task_id=task_id)
    holder = redis_leases.store.holder(task_id)
    wait_for(lambda: executions(stack, k) == 2)  # the requeued run, holding
    assert redis_leases.store.holder(task_id) == holder is not None
    with recorded_publishes() as published:
        redis_leases.send(tasks_dedup.reject_once, k, task_id=task_id)
    assert published == []  # still taken: deduplicated
    assert result.get(timeout=RESULT_TIMEOUT) == 2
    wait_for(lambda: redis_leases.store.holder(task_id) is None)
    assert executions(stack, k) == 2


def test_a_run_ended_by_ignore_frees_its_id(stack: Services, redis_leases: Target) -> None:
    k = new_key()
    task_id = f"update-{k}"
    redis_leases.send(tasks_dedup.ignore, k, task_id=task_id)
    wait_for(lambda: executions(stack, k) == 1)
    wait_for(lambda: redis_leases.store.holder(task_id) is None)


def test_a_message_rejected_for_good_frees_its_id(stack: Services, redis_leases: Target) -> None:
    """``Reject(requeue=False)``: the message does not come back, so its lease goes."""
    k = new_key()
    task_id = f"update-{k}"
    redis_leases.send(tasks_dedup.reject_for_good, k, task_id=task_id)
    wait_for(lambda: executions(stack, k) == 1)
    wait_for(lambda: redis_leases.store.holder(task_id) is None)


# -- Redis-only scenarios ------------------------------------------------------


def test_calls_without_task_id_do_not_touch_leases(
    stack: Services, redis_leases: Target, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*_: Any, **__: Any) -> None:
        raise AssertionError("a call without task_id reached the deduplicator")

    monkeypatch.setattr(deduplicator, "send", refuse)
    k = new_key()
    first, second = redis_leases.send(tasks_dedup.run, k), redis_leases.send(tasks_dedup.run, k)
    assert first.get(timeout=RESULT_TIMEOUT) == first.id
    assert second.get(timeout=RESULT_TIMEOUT) == second.id
    assert executions(stack, k) == 2


def test_lease_of_a_crashed_worker_expires(
    stack: Services,
    redis_leases: Target,
    private_redis: RedisServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The worker dies with the task (SIGKILL): the id is blocked until the lease expires."""
    monkeypatch.setattr(dedup, "lease_lifetime", lambda *_: 3.0)
    store = redis_leases.store
    broker = private_redis.url(3)
    env = {"CELERY_BROKER_URL": broker, "BACKGROUND_DEDUP_REDIS_URL": redis_leases.broker_url}
    k = new_key()
    task_id = f"update-{k}"
    with Connection(broker) as connection:
        producer = celery_app.amqp.Producer(connection, auto_declare=True)
        with WorkerProcess(env, include=DEDUP_TASKS) as crashing:
            tasks_dedup.run.apply_async((k, 60.0), task_id=task_id, producer=producer)
            wait_for(lambda: executions(stack, k) == 1)
            crashing.kill()
        holder = store.holder(task_id)
        assert holder is not None
        tasks_dedup.run.apply_async((k,), task_id=task_id, producer=producer)
        assert store.holder(task_id) == holder  # deduplicated, not re-sent
        wait_for(lambda: store.holder(task_id) is None, timeout=15)
        tasks_dedup.run.apply_async((k,), task_id=task_id, producer=producer)
        with WorkerProcess(env, include=DEDUP_TASKS):
            wait_for(lambda: executions(stack, k) == 2)
            wait_for(lambda: store.holder(task_id) is None)


def test_a_task_that_starts_extends_its_lease_past_the_original_lifetime(
    stack: Services, redis_leases: Target, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker extends the lease when the task starts: a full lifetime from the start.

    Lifetime 6 s. The task starts after 3 s and runs 8 s. The control, sent
    just after it with the same lifetime but a 10 s countdown, has not started
    when its lease expires (the lifetime really was 6 s); the task's lease,
    taken first, is still held then, with the same token: extended.
    """
    lifetime = 6.0
    monkeypatch.setattr(dedup, "lease_lifetime", lambda *_: lifetime)
    store = redis_leases.store
    k, waiting = new_key(), new_key()
    task_id, control_id = f"update-{k}", f"update-{waiting}"
    result = redis_leases.send(tasks_dedup.run, k, 8.0, task_id=task_id, countdown=3)
    control = redis_leases.send(tasks_dedup.run, waiting, task_id=control_id, countdown=10)
    holder = store.holder(task_id)
    assert holder not in (None, REVOKED)
    wait_for(lambda: executions(stack, k) == 1)  # started
    # Not started: the control's lease expires after its lifetime (so would the task's).
    wait_for(lambda: store.holder(control_id) is None, timeout=lifetime + 5)
    assert executions(stack, waiting) == 0, "the control started too early to mean anything"
    assert not result.ready()
    assert store.holder(task_id) == holder  # started: extended
    assert result.get(timeout=RESULT_TIMEOUT) == task_id
    wait_for(lambda: store.holder(task_id) is None)
    control.get(timeout=RESULT_TIMEOUT)


def test_a_period_ending_within_the_second_keeps_its_id_until_then(
    redis_leases: Target,
) -> None:
    """The end of a run in its period's last second: the id is kept, not freed early."""
    store, task_id, token = redis_leases.store, f"tick-{new_key()}", uuid.uuid4().hex
    assert store.acquire(task_id, token, 30.0) == token
    ends = time.time() + 0.8
    deduplicator.finished(task_id, {TOKEN_HEADER: token, KEEP_UNTIL_HEADER: ends})
    assert store.holder(task_id) == token
    wait_for(lambda: store.holder(task_id) is None, timeout=10)  # kept until the period ends


def test_a_periods_lease_lives_until_the_period_ends_not_longer(
    redis_leases: Target, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its lifetime: the task's own, or until the period ends if that is later; never beyond."""
    store, lifetimes = deduplicator.store, []
    acquire = store.acquire

    def recording(key: str, token: str, ttl: float) -> str | None:
        lifetimes.append(ttl)
        return acquire(key, token, ttl)

    monkeypatch.setattr(store, "acquire", recording)
    period = 30 * 24 * 3600.0  # far longer than the task's own lifetime
    started = time.time()
    redis_leases.send(tasks_dedup.tick, headers={PERIOD_HEADER: f"every:{period:g}"})
    (ttl,) = lifetimes
    assert 0 < ttl <= period - (started % period) + 1


def test_a_failing_lease_store_is_logged_with_the_task_id(
    redis_leases: Target, framework_log: Records, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lease then expires by itself; the line names the task whose lease it is."""
    task_id = f"update-{new_key()}"
    # A lease store whose server refuses connections: a real failure.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        broken = RedisLeaseStore(f"redis://127.0.0.1:{sock.getsockname()[1]}/0")
        monkeypatch.setattr(deduplicator, "_store", broken)
        deduplicator.started(task_id, {TOKEN_HEADER: "t", TTL_HEADER: 60.0})
    (line,) = [r for r in framework_log.records if r.getMessage().startswith("Task lease update")]
    assert line.fields["task_id"] == task_id  # type: ignore[attr-defined]


def test_a_retry_extends_its_lease_and_a_retry_without_one_takes_none(
    stack: Services, redis_leases: Target
) -> None:
    """What Celery's ``Task.retry`` sends: the same id, ``retries`` > 0, the first send's headers.

    The retry's send extends the lease it carries (a full lifetime from now):
    past the short lifetime the lease was taken with, and before the retry
    runs, it is still held, while the control, taken at the same time with the
    same lifetime, has expired.
    A retry of a task sent without a custom id carries no lease and takes none.
    """
    store, short = redis_leases.store, 1.0
    k, control_id = new_key(), f"update-{new_key()}"
    task_id, token = f"update-{k}", uuid.uuid4().hex
    assert store.acquire(task_id, token, short) == token
    assert store.acquire(control_id, "control", short) == "control"
    with recorded_publishes() as published:
        # A retry's countdown: the worker holds it, its start does not extend the lease yet.
        redis_leases.send(tasks_dedup.run, k, task_id=task_id, retries=1, countdown=6,
                          headers={TOKEN_HEADER: token, TTL_HEADER: 60.0})  # fmt: skip
    assert published == ["tests.dedup.run"]  # a retry is sent, never deduplicated
    wait_for(lambda: store.holder(control_id) is None, timeout=short + 4)
    assert executions(stack, k) == 0, "the retry ran too early to mean anything"
    assert store.holder(task_id) == token  # extended by the retry's send
    wait_for(lambda: executions(stack, k) == 1)
    wait_for(lambda: store.holder(task_id) is None)

    plain = new_key()
    plain_id = uuid.uuid4().hex  # Celery's own id of a task sent without task_id
    redis_leases.send(tasks_dedup.run, plain, task_id=plain_id, retries=1, headers={})
    assert store.holder(plain_id) is None
    wait_for(lambda: executions(stack, plain) == 1)


def test_revoked_id_is_refused_with_a_clear_error(stack: Services, redis_leases: Target) -> None:
    k = new_key()
    task_id = f"notify-{k}"
    # The countdown outlasts the revoke command's start-up (seconds on a loaded machine):
    # revoked while it waits, so the lease turns REVOKED when it falls due, and it never runs.
    redis_leases.send(tasks_dedup.run, k, task_id=task_id, countdown=8)
    # Celery's own command, on the private broker (the env var is Celery's broker setting).
    subprocess.run(
        [sys.executable, "-m", "celery", "-A", "app.core.background.celery_app", "control",
         "revoke", task_id],
        env={**os.environ, **redis_leases.env},
        check=True,
        capture_output=True,
        timeout=60,
    )  # fmt: skip
    wait_for(lambda: redis_leases.store.holder(task_id) == REVOKED)
    with pytest.raises(TaskIdRevokedError, match="revoked"):
        redis_leases.send(tasks_dedup.run, k, task_id=task_id)
    assert executions(stack, k) == 0


# Its own waits: the control command 60 + a worker start 60 + 30 + 30 = 180 s.
@pytest.mark.timeout(240)
def test_a_revoke_while_no_worker_runs_is_not_remembered(
    stack: Services, redis_leases: Target, private_redis: RedisServer
) -> None:
    """No worker hears the revoke: the task runs once one starts, and its lease ends normally.

    (The guide's "Revoked and expired ids": Celery does not remember it either.)
    """
    store = redis_leases.store
    broker = private_redis.url(4)  # a broker no worker consumes from yet
    env = {"CELERY_BROKER_URL": broker, "BACKGROUND_DEDUP_REDIS_URL": redis_leases.broker_url}
    k = new_key()
    task_id = f"notify-{k}"
    with Connection(broker) as connection:
        producer = celery_app.amqp.Producer(connection, auto_declare=True)
        tasks_dedup.run.apply_async((k,), task_id=task_id, producer=producer)
        holder = store.holder(task_id)
        assert holder not in (None, REVOKED)
        revoke = subprocess.run(
            [sys.executable, "-m", "celery", "-A", "app.core.background.celery_app", "control",
             "revoke", task_id],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=60,
        )  # fmt: skip
        # Celery's own word that no worker heard it.
        assert "No nodes replied" in revoke.stdout + revoke.stderr, revoke
        assert store.holder(task_id) == holder  # not marked revoked
        with WorkerProcess(env, include=DEDUP_TASKS):
            wait_for(lambda: executions(stack, k) == 1)
            wait_for(lambda: store.holder(task_id) is None)
    assert executions(stack, k) == 1


def test_expired_task_is_refused_like_a_revoked_one(stack: Services, redis_leases: Target) -> None:
    """``expires`` passed before the run: Celery marks the id revoked, so do we."""
    k = new_key()
    task_id = f"update-{k}"
    redis_leases.send(tasks_dedup.run, k, task_id=task_id, countdown=2, expires=1)
    wait_for(lambda: redis_leases.store.holder(task_id) == REVOKED)
    with pytest.raises(TaskIdRevokedError):
        redis_leases.send(tasks_dedup.run, k, task_id=task_id)
    assert executions(stack, k) == 0


def test_hard_time_limit_fails_the_task_and_frees_its_id(
    stack: Services, redis_leases: Target
) -> None:
    """The pool kills the process at ``time_limit``: the task fails, and its id is free again."""
    k = new_key()
    task_id = f"update-{k}"
    result = redis_leases.send(tasks_dedup.outlive_soft_limit, k, task_id=task_id)
    with pytest.raises(Exception) as raised:  # noqa: PT011 - the type is checked below
        result.get(timeout=RESULT_TIMEOUT)
    assert type(raised.value).__name__ == "TimeLimitExceeded"
    assert executions(stack, k) == 1
    # Not left to expire (its lifetime is far longer than this wait).
    wait_for(lambda: redis_leases.store.holder(task_id) is None)


def test_worker_death_runs_the_task_again_once_under_the_same_lease(
    stack: Services, redis_leases: Target
) -> None:
    """The pool process dies mid-task: Celery retries it (same id, same token), once."""
    k = new_key()
    task_id = f"update-{k}"
    result = redis_leases.send(tasks_dedup.die_once, k, task_id=task_id)
    assert result.get(timeout=RESULT_TIMEOUT) == 1
    assert executions(stack, k) == 2
    wait_for(lambda: redis_leases.store.holder(task_id) is None)


def entered(stack: Services, key: str) -> int:
    """How many times a body ran at all (rows of its own connection, never rolled back)."""
    return executions(stack, f"{key}-entered")


def test_db_task_killed_after_its_commit_is_not_run_again(
    stack: Services, redis_leases: Target
) -> None:
    """Killed between commit and acknowledgement: the redelivery sees the completion row."""
    k = new_key()
    task_id = f"update-{k}"
    result = redis_leases.send(tasks_dedup.commit_then_die, k, task_id=task_id)
    outcome = result.get(timeout=RESULT_TIMEOUT)
    assert outcome == {"status": "success", "task_id": task_id, "already_completed": True}
    assert executions(stack, k) == 1
    # Skipped before the body, not run and rolled back: a side effect outside
    # the transaction (an e-mail) happens once.
    assert entered(stack, k) == 1
    wait_for(lambda: redis_leases.store.holder(task_id) is None)


def test_db_task_killed_after_its_own_explicit_commit_is_not_run_again(
    stack: Services, redis_leases: Target
) -> None:
    """The completion row goes with the body's own ``await ctx.session.commit()``."""
    k = new_key()
    task_id = f"update-{k}"
    result = redis_leases.send(tasks_dedup.commit_explicitly_then_die, k, task_id=task_id)
    outcome = result.get(timeout=RESULT_TIMEOUT)
    assert outcome == {"status": "success", "task_id": task_id, "already_completed": True}
    assert executions(stack, k) == 1
    wait_for(lambda: redis_leases.store.holder(task_id) is None)


def test_db_task_failing_after_an_explicit_commit_is_retried_and_runs_again(
    stack: Services, redis_leases: Target
) -> None:
    """The run did not complete: its row is removed, so the retry is not skipped."""
    k = new_key()
    task_id = f"update-{k}"
    result = redis_leases.send(tasks_dedup.commit_explicitly_then_fail, k, task_id=task_id)
    assert result.get(timeout=RESULT_TIMEOUT) == 1
    assert executions(stack, k) == 2  # attempt 0 committed its row, then attempt 1 its own


def test_a_bulk_job_killed_after_a_batch_runs_again_from_the_start(
    stack: Services, redis_leases: Target
) -> None:
    """``ctx.commit_batch()`` does not complete the run: only the body's return does."""
    k = new_key()
    task_id = f"update-{k}"
    result = redis_leases.send(tasks_dedup.batch_then_die, k, task_id=task_id)
    assert result.get(timeout=RESULT_TIMEOUT) == 1
    assert executions(stack, k) == 2


def test_without_task_id_the_same_death_completes_the_work_twice(
    stack: Services, redis_leases: Target
) -> None:
    """The control: at-least-once delivery, nothing to tell the redelivery apart."""
    k = new_key()
    result = redis_leases.send(tasks_dedup.commit_then_die, k)
    assert result.get(timeout=RESULT_TIMEOUT) == 1
    assert executions(stack, k) == 2
    assert entered(stack, k) == 2


def test_two_deliveries_running_at_once_commit_once(stack: Services, redis_leases: Target) -> None:
    """The same run-once message delivered twice, both bodies inside their transaction at once.

    Both run (they started before either committed); the completion row lets
    only the first commit through, and the second rolls back its writes.
    """
    k = new_key()
    task_id = f"update-{k}"
    # Two copies of one message: the headers a deduplicated send gives it, twice.
    headers = {TOKEN_HEADER: uuid.uuid4().hex, TTL_HEADER: 600.0}
    message = Message(
        tasks_dedup.hold_then_write, (k, 2.0), {}, task_id, redis_leases.options, headers
    )
    for _ in range(2):
        publish(celery_app, message)  # the one send path, without taking a lease
    wait_for(lambda: executions(stack, f"{k}-done") == 2, timeout=RESULT_TIMEOUT)
    assert entered(stack, k) == 2
    assert executions(stack, k) == 1


def test_worker_death_without_retries_left_frees_the_id(
    stack: Services, redis_leases: Target
) -> None:
    k = new_key()
    task_id = f"update-{k}"
    result = redis_leases.send(tasks_dedup.die_always, k, task_id=task_id)
    with pytest.raises(WorkerLostError):
        result.get(timeout=RESULT_TIMEOUT)
    wait_for(lambda: redis_leases.store.holder(task_id) is None)
    assert executions(stack, k) == 1


# -- periodic tasks ------------------------------------------------------------


def test_same_period_fired_twice_runs_once_and_keeps_its_lease(
    stack: Services, redis_leases: Target
) -> None:
    """What two beats do: the same entry sent twice within one period."""
    entry = celery_app.conf.beat_schedule["tests.dedup.tick-every-2s"]
    seconds = 30.0
    options = {**entry["options"], "headers": {PERIOD_HEADER: f"every:{seconds:g}"}}
    if time.time() % seconds > seconds - 5:
        # Not across a period boundary: wait for the next period to begin (its
        # start is known; this is a wait for the clock, not for another process).
        time.sleep(seconds - time.time() % seconds + 0.05)
    first = redis_leases.send(tasks_dedup.tick, **options)
    second = redis_leases.send(tasks_dedup.tick, **options)
    assert first.id == second.id
    assert first.id.startswith("tests.dedup.tick:every30s-")
    first.get(timeout=RESULT_TIMEOUT)
    assert executions(stack, f"tick:{first.id}") == 1
    # The period is not over: its id stays taken after the run.
    assert redis_leases.store.holder(first.id) is not None
    redis_leases.send(tasks_dedup.tick, **options)
    assert executions(stack, f"tick:{first.id}") == 1


def test_two_beat_processes_run_each_period_once(stack: Services, redis_target: Target) -> None:
    """Two ``celery beat`` processes on one schedule: each period runs once."""
    folder = Path(tempfile.mkdtemp(prefix="beat-"))
    outputs = [(folder / f"beat-{n}.log").open("wb") for n in range(2)]
    beats = [
        subprocess.Popen(
            [
                sys.executable, "-m", "celery", "-A", "tests.support.beat_app", "beat",
                "--schedule", str(folder / f"schedule-{n}"), "--loglevel", "INFO",
            ],
            stdout=outputs[n],
            env={**os.environ, **redis_target.env},
            stderr=subprocess.STDOUT,
        )
        for n in range(2)
    ]  # fmt: skip

    def sent() -> list[int]:
        return [
            (folder / f"beat-{n}.log")
            .read_text()
            .count("Sending due task tests.dedup.tick-every-2s")
            for n in range(2)
        ]

    def both_beats_sent_periods_twice() -> bool:
        # Each beat starts on its own clock: wait until both have sent, and more
        # often than periods ran (with room for one period still running).
        periods, counts = _tick_periods(stack), sent()
        return periods >= 3 and min(counts) >= 1 and sum(counts) >= periods + 2

    try:
        wait_for(both_beats_sent_periods_twice, timeout=60)
    finally:
        for beat in beats:
            beat.terminate()
            beat.wait(20)
        for output in outputs:
            output.close()
    # Some period was sent twice (control: both beats sent) and ran once.
    assert sum(sent()) > _tick_periods(stack), sent()
    counts = fetchval(
        stack,
        "SELECT array_agg(n) FROM (SELECT count(*) AS n FROM test_records "
        "WHERE key LIKE 'tick:tests.dedup.tick:every2s-%' "
        "GROUP BY split_part(key, ':', 3)) AS periods",
    )
    assert counts
    assert set(counts) == {1}


def _tick_periods(stack: Services) -> int:
    return int(
        fetchval(
            stack,
            "SELECT count(DISTINCT split_part(key, ':', 3)) FROM test_records "
            "WHERE key LIKE 'tick:tests.dedup.tick:every2s-%'",
        )
    )
