"""The asyncio pool (app.core.background.pool) on real workers: many async runs in one process.

Every worker here is ONE process (``-P custom`` with the pool's public path):
runs that overlap do so on its one event loop. Overlap is shown by the runs'
own start and end times (every run started before any ended), not by a
timing threshold.

Most tests share one worker (``shared``, concurrency 100) on a Redis database
of this module's own: each waits for every run it started, so the next one
finds the worker idle. Tests that stop or kill their worker start their own.
"""

from __future__ import annotations

import base64
import itertools
import json
import signal
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

import pytest
from celery.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded
from kombu import Connection

from app.core.background import celery_app
from app.core.background.internals.delivery.dedup import deduplicator
from app.core.background.internals.delivery.lease_stores import RedisLeaseStore
from app.core.background.internals.delivery.publish import Message, publish
from app.core.background.internals.operations.status import get_task_status
from app.core.background.internals.operations.worker_process import (
    WorkerProcess,
    WorkerStartError,
)
from app.core.background.internals.registry import TOKEN_HEADER, TTL_HEADER
from app.core.background.internals.retry import RETRY_POLICIES
from tests.conftest import TEST_TASK_MODULES, PrivateBroker
from tests.support import tasks_asyncio_pool
from tests.support.db import fetchval
from tests.support.dead_letters import letter_of
from tests.support.metrics import http_get, metric, parse_metrics, start_serving_metrics
from tests.support.publishes import recorded_publishes
from tests.support.services import Services

TIMEOUT = 60
SKIPPED = "Task already completed by an earlier delivery; skipped"
POOL_PATH = "app.core.background.pool:AsyncioPool"
SHORT_VISIBILITY = "tests.reliability.short_visibility"
SHARED_CONCURRENCY = 100
# The shared worker's engine waits this long for a free connection (default 30 s).
SHARED_POOL_TIMEOUT = 2


def asyncio_worker(
    broker: PrivateBroker,
    concurrency: int,
    *,
    env: dict[str, str] | None = None,
    include: tuple[str, ...] = (),
) -> WorkerProcess:
    return WorkerProcess(
        {**broker.env, "CELERY_CUSTOM_WORKER_POOL": POOL_PATH, **(env or {})},
        pool="custom",
        concurrency=concurrency,
        include=[*TEST_TASK_MODULES, *include],
    )


@pytest.fixture(scope="module")
def shared(module_broker: PrivateBroker, stack: Services) -> Iterator[WorkerProcess]:
    env = {"DATABASE_POOL_TIMEOUT": str(SHARED_POOL_TIMEOUT)}
    with asyncio_worker(module_broker, SHARED_CONCURRENCY, env=env) as worker:
        yield worker


def redis_of(broker: PrivateBroker) -> Any:
    """A client of the broker's database (queues, unacked messages, the tasks' counters)."""
    return broker.app.connection_for_write().default_channel.client


def wait_until(condition: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.05)


def json_lines(log: str) -> list[dict[str, Any]]:
    lines = []
    for line in log.splitlines():
        if line.startswith("{"):
            try:
                lines.append(json.loads(line))
            except ValueError:
                continue
    return lines


def lines_of(worker: WorkerProcess, task_id: str) -> list[dict[str, Any]]:
    return [line for line in json_lines(worker.log()) if line.get("task_id") == task_id]


def all_overlapped(runs: list[dict[str, Any]]) -> bool:
    """Every run started before the first one ended: all were in flight at once."""
    return max(run["start"] for run in runs) < min(run["end"] for run in runs)


def unacked_ids(redis: Any) -> set[str]:
    """Ids of the messages the broker counts as delivered and not acknowledged."""
    # kombu keeps [message, exchange, routing_key]; a task message names its id
    # in its headers (Celery's protocol 2) or its body (protocol 1).
    ids = set()
    for raw in redis.hvals("unacked"):
        message = json.loads(raw)[0]
        task_id = message.get("headers", {}).get("id") or _body_id(message)
        if task_id is None:
            # Seen once in a full-suite run on a loaded machine; printed with a failure.
            print("unacked message without a task id:", message)
        ids.add(task_id)
    ids.discard(None)
    return ids


def _body_id(message: dict[str, Any]) -> str | None:
    body = message.get("body")
    if message.get("properties", {}).get("body_encoding") == "base64" and isinstance(body, str):
        body = base64.b64decode(body)
    try:
        decoded = json.loads(body) if isinstance(body, str | bytes) else body
    except ValueError:
        return None
    return decoded.get("id") if isinstance(decoded, dict) else None


def new_key() -> str:
    return uuid.uuid4().hex[:10]


# -- many runs in one process --------------------------------------------------


def test_100_async_runs_await_side_by_side_and_a_sync_body_runs_in_a_thread(
    module_broker: PrivateBroker, shared: WorkerProcess
) -> None:
    app = module_broker.app
    keys = [f"k{i}" for i in range(100)]
    sent = {
        key: app.send_task("pool.sleep", kwargs={"key": key, "seconds": 0.5, "ticks": 5})
        for key in keys
    }
    sync = app.send_task("pool.sync_sleep", kwargs={"key": "sync", "seconds": 0.5})
    runs = {key: result.get(timeout=TIMEOUT) for key, result in sent.items()}
    sync_run = sync.get(timeout=TIMEOUT)
    stats = app.control.inspect(timeout=5).stats() or {}  # the module's one worker
    log = shared.log()

    assert all_overlapped(list(runs.values()))
    assert {run["pid"] for run in runs.values()} == {shared.pid}
    # All on the pool's one loop thread; the sync body in a thread of its own.
    assert {run["thread"] for run in runs.values()} == {"background-asyncio-pool"}
    assert sync_run["pid"] == shared.pid
    assert sync_run["thread"].startswith("background-sync-task")
    for key, run in runs.items():
        # The run's own id, from the framework's context and from Celery's
        # greenlet-local request, before and after its awaits.
        task_id = sent[key].id
        assert run["ctx_task_id"] == run["celery_task_id"] == task_id
        assert run["after"]["ctx_task_id"] == run["after"]["celery_task_id"] == task_id
    # Plain log lines (no fields given) carry the task id of the run that logged
    # them, with 100 runs interleaved on one thread: context variables.
    ids = {result.id for result in sent.values()}
    ticks = [
        line
        for line in json_lines(log)
        if line.get("logger") == "tests.asyncio_pool.plain" and line.get("task_id") in ids
    ]
    assert len(ticks) == 500
    for line in ticks:
        key = line["event"].rsplit(" ", 1)[-1]
        assert line["task_id"] == sent[key].id, line
        assert line["task_name"] == "pool.sleep"
    assert Counter(line["event"].rsplit(" ", 1)[-1] for line in ticks) == dict.fromkeys(keys, 5)
    (info,) = stats.values()
    assert info["pool"]["max-concurrency"] == SHARED_CONCURRENCY
    assert info["pool"]["implementation"].endswith(":AsyncioPool")
    # Prefetch follows the concurrency (multiplier 1): see also the gated test.
    assert info["prefetch_count"] == SHARED_CONCURRENCY
    ids.add(sync.id)
    assert not [
        line for line in json_lines(log) if line.get("task_id") in ids and line["level"] == "error"
    ]


def test_db_runs_share_an_engine_sized_to_the_concurrency_and_a_pool_timeout_is_retried(
    module_broker: PrivateBroker, shared: WorkerProcess
) -> None:
    """40 db runs at once on an engine of 20 + 10 connections: 10 wait, time out, retry.

    The first 30 hold their connection longer than the pool timeout, so the
    other 10 cannot get one in time: SQLAlchemy's TimeoutError, a retriable
    error, sends them back with the policy's delay, and they succeed.
    """
    app = module_broker.app
    hold = SHARED_POOL_TIMEOUT + 1.5
    results = [
        app.send_task("pool.db_hold", kwargs={"key": f"d{i}", "seconds": hold}) for i in range(40)
    ]
    runs = [result.get(timeout=TIMEOUT) for result in results]
    log_lines = json_lines(shared.log())

    assert {run["pid"] for run in runs} == {shared.pid}
    assert {run["pool_size"] for run in runs} == {20}  # min(concurrency 100, cap 20)
    first_tries = [run for run in runs if run["attempt"] == 0]
    assert len(first_tries) <= 30
    assert all_overlapped(first_tries)
    assert len({run["backend"] for run in first_tries}) == len(first_tries)
    assert sum(run["attempt"] > 0 for run in runs) >= 10
    ids = {result.id for result in results}
    timeouts = [
        line
        for line in log_lines
        if line.get("task_id") in ids and line.get("event") == "Task failed, will retry"
    ]
    assert len(timeouts) >= 10
    assert {line["error_type"] for line in timeouts} == {"TimeoutError"}
    assert all("QueuePool limit" in line["error"] for line in timeouts)
    for trap in ("attached to a different loop", "another operation is in progress"):
        assert not any(trap in json.dumps(line) for line in log_lines)


# -- time limits, retries, a blocked loop ------------------------------------------


def test_the_soft_time_limit_cancels_only_the_run_that_went_over(
    module_broker: PrivateBroker, shared: WorkerProcess
) -> None:
    app = module_broker.app
    others = [
        app.send_task("pool.sleep", kwargs={"key": f"o{i}", "seconds": 3.0, "ticks": 3})
        for i in range(19)
    ]
    slow = app.send_task("pool.sleep", kwargs={"key": "slow", "seconds": 30.0}, soft_time_limit=1)
    runs = [result.get(timeout=TIMEOUT) for result in others]
    with pytest.raises(SoftTimeLimitExceeded):
        slow.get(timeout=TIMEOUT)
    assert slow.state == "FAILURE"
    # Celery's own line: "Soft time limit (1s) exceeded for pool.sleep[<id>]".
    (soft_line,) = [
        line
        for line in json_lines(shared.log())
        if line.get("event", "").startswith("Soft time limit (1") and slow.id in line["event"]
    ]
    # The others were running when the slow one was cancelled, and went on to
    # the end of their own sleep.
    cancelled_at = datetime.fromisoformat(soft_line["timestamp"]).timestamp()
    assert all(run["start"] < cancelled_at < run["end"] for run in runs)
    assert all_overlapped(runs)


def test_the_hard_time_limit_ends_a_run_that_ignores_its_soft_limit_and_acks_it(
    module_broker: PrivateBroker, shared: WorkerProcess, stack: Services
) -> None:
    app = module_broker.app
    redis = redis_of(module_broker)
    key = new_key()
    others = [
        app.send_task("pool.sleep", kwargs={"key": f"h{i}", "seconds": 3.0, "ticks": 3})
        for i in range(9)
    ]
    stubborn = app.send_task(
        "pool.stubborn", kwargs={"key": key, "seconds": 30.0}, soft_time_limit=1, time_limit=2
    )
    runs = [result.get(timeout=TIMEOUT) for result in others]
    with pytest.raises(TimeLimitExceeded):
        stubborn.get(timeout=TIMEOUT)
    # Acknowledged with its failure (as prefork does), not left for the
    # visibility timeout to deliver again an hour later.
    wait_until(lambda: stubborn.id not in unacked_ids(redis), "the stubborn run acknowledged")
    after = app.send_task("pool.sleep", kwargs={"key": "after", "seconds": 0.1})
    assert after.get(timeout=TIMEOUT)["key"] == "after"
    assert redis.get(f"soft:{key}") == b"1"
    assert redis.get(f"completed:{key}") is None
    assert all_overlapped(runs)
    assert any(
        line.get("event", "").startswith("Hard time limit (2") and stubborn.id in line["event"]
        for line in json_lines(shared.log())
    )
    letter = letter_of(stack, stubborn.id)
    assert (letter.reason, letter.error_type, letter.task_name) == (
        "time limit", "TimeLimitExceeded", "pool.stubborn",
    )  # fmt: skip
    assert letter.call() == ([], {"key": key, "seconds": 30.0})


def test_retries_wait_at_least_their_policys_delay(
    module_broker: PrivateBroker, shared: WorkerProcess
) -> None:
    """20 runs fail twice each (retriable): each retry comes after the policy's scaled delay."""
    app = module_broker.app
    redis = redis_of(module_broker)
    prefix = new_key()
    keys = [f"{prefix}-{i}" for i in range(20)]
    results = [app.send_task("pool.fails_twice", kwargs={"key": key}) for key in keys]
    assert [result.get(timeout=TIMEOUT)["attempt"] for result in results] == [2] * 20
    policy = RETRY_POLICIES["aggressive"]
    scale = celery_app.conf.background_retry_delay_scale  # the tests' 0.01
    for key, result in zip(keys, results, strict=True):
        starts = [float(x) for x in redis.lrange(f"attempts:{key}", 0, -1)]
        assert len(starts) == 3
        for retries, (before, after) in enumerate(itertools.pairwise(starts)):
            assert after - before >= policy.nominal_delay(retries) * scale
        retry_lines = [
            line
            for line in lines_of(shared, result.id)
            if line.get("event") == "Task failed, will retry"
        ]
        assert [line["attempt"] for line in retry_lines] == [0, 1]
        for line in retry_lines:
            retries = line["attempt"]
            # The delay asked for: the scaled nominal delay plus at most its jitter.
            assert policy.nominal_delay(retries) * scale <= line["retry_in"]
            assert line["retry_in"] <= policy.longest_delay_for(retries) * scale + 0.001


def test_a_task_that_blocks_the_loop_is_logged_with_its_name_and_time(
    module_broker: PrivateBroker, shared: WorkerProcess
) -> None:
    result = module_broker.app.send_task("pool.block_loop", kwargs={"seconds": 0.3})
    result.get(timeout=TIMEOUT)

    def blocked_lines() -> list[dict[str, Any]]:
        return [
            line
            for line in lines_of(shared, result.id)
            if line.get("event") == "Task blocked the event loop"
        ]

    # Logged when the loop gets control back, just after the result is stored.
    wait_until(lambda: bool(blocked_lines()), "the blocked-loop line", timeout=10)
    (line,) = blocked_lines()
    assert line["task_name"] == "pool.block_loop"
    assert line["blocked_for"] >= 0.3
    assert line["level"] == "warning"


def test_progress_and_the_status_api_of_a_retried_run(
    module_broker: PrivateBroker, shared: WorkerProcess
) -> None:
    """``tests.progress_after_retry``: fails once, publishes progress, waits for its release."""
    app = module_broker.app
    key = new_key()
    result = app.send_task("tests.progress_after_retry", kwargs={"key": key})
    wait_until(lambda: result.state == "PROGRESS", "progress published")
    status = get_task_status(app, result.id)
    assert (status.state, status.attempt) == ("progress", 1)
    assert status.progress == {"done": 1, "total": 2, "percent": 50.0}
    redis_of(module_broker).set(f"release:{key}", 1)
    assert result.get(timeout=TIMEOUT)["attempt"] == 1
    assert get_task_status(app, result.id).state == "success"


# -- revoke, deduplication, run-once -------------------------------------------


def test_revoke_with_terminate_ends_only_that_run(
    module_broker: PrivateBroker, shared: WorkerProcess
) -> None:
    app = module_broker.app
    redis = redis_of(module_broker)
    prefix = new_key()
    victim = app.send_task("pool.mark", kwargs={"key": f"{prefix}-victim", "seconds": 3.0})
    others = [
        app.send_task("pool.mark", kwargs={"key": f"{prefix}-{i}", "seconds": 3.0})
        for i in range(9)
    ]
    wait_until(lambda: bool(redis.get(f"started:{prefix}-victim")), "the victim started")
    app.control.revoke(victim.id, terminate=True)
    assert [result.get(timeout=TIMEOUT)["attempt"] for result in others] == [0] * 9
    wait_until(lambda: victim.state == "REVOKED", "the victim revoked", timeout=10)
    assert redis.get(f"completed:{prefix}-victim") is None
    assert [int(redis.get(f"completed:{prefix}-{i}") or 0) for i in range(9)] == [1] * 9
    wait_until(lambda: victim.id not in unacked_ids(redis), "the victim acknowledged")


def test_revoking_a_running_db_run_cancels_it_rolls_back_and_the_others_go_on(
    module_broker: PrivateBroker, shared: WorkerProcess, stack: Services
) -> None:
    """No ``terminate``: the revoked run's coroutine is cancelled at its await, on the pool."""
    from app.core.background.operations import revoke

    app = module_broker.app
    redis = redis_of(module_broker)
    prefix = new_key()
    victim = app.send_task(
        "pool.write_then_hold", kwargs={"key": f"{prefix}-victim", "seconds": 60.0}
    )
    others = [
        app.send_task("pool.write_then_hold", kwargs={"key": f"{prefix}-{i}", "seconds": 3.0})
        for i in range(9)
    ]
    wait_until(lambda: bool(redis.get(f"started:{prefix}-victim")), "the victim started")
    assert revoke(app, victim.id) == "revoked"
    assert [result.get(timeout=TIMEOUT)["status"] for result in others] == ["success"] * 9

    def cancelled_lines() -> list[dict[str, Any]]:
        return [
            line
            for line in lines_of(shared, victim.id)
            if line.get("event") == "Task revoked while running: cancelled"
        ]

    wait_until(lambda: bool(cancelled_lines()), "the victim's run cancelled", timeout=15)
    wait_until(lambda: victim.id not in unacked_ids(redis), "the victim acknowledged")
    assert victim.state == "REVOKED"
    written = "SELECT count(*) FROM test_records WHERE key LIKE $1"
    assert fetchval(stack, written, f"{prefix}-victim:%") == 0  # its transaction rolled back
    assert fetchval(stack, written, f"{prefix}-_:%") == 9  # "_": one character, 0 to 8
    assert shared.process is not None
    assert shared.process.poll() is None
    after = app.send_task("pool.sleep", kwargs={"key": prefix, "seconds": 0.0})
    assert after.get(timeout=TIMEOUT)["pid"] == shared.pid


@pytest.fixture
def leases(module_broker: PrivateBroker, monkeypatch: pytest.MonkeyPatch) -> RedisLeaseStore:
    """This process's ``apply_async`` takes its leases where the shared worker releases them."""
    store = RedisLeaseStore(module_broker.url)
    monkeypatch.setattr(deduplicator, "_store", store)
    return store


@pytest.fixture
def producer_options(module_broker: PrivateBroker) -> Iterator[dict[str, Any]]:
    """Send the framework's way (leases, headers) to the shared worker's broker."""
    connection = Connection(module_broker.url)
    try:
        yield {"producer": celery_app.amqp.Producer(connection, auto_declare=True)}
    finally:
        connection.release()


def test_a_task_id_is_deduplicated_while_it_runs_and_freed_after(
    module_broker: PrivateBroker,
    shared: WorkerProcess,
    leases: RedisLeaseStore,
    producer_options: dict[str, Any],
) -> None:
    redis = redis_of(module_broker)
    key = new_key()
    task_id = f"pool-{key}"
    task = tasks_asyncio_pool.mark
    first = task.apply_async((key, 1.0), task_id=task_id, **producer_options)
    wait_until(lambda: bool(redis.get(f"started:{key}")), "the first run started")
    with recorded_publishes() as published:
        second = task.apply_async((key, 0.0), task_id=task_id, **producer_options)
    assert second.id == first.id == task_id
    assert published == []  # deduplicated: no second message
    assert module_broker.app.AsyncResult(task_id).get(timeout=TIMEOUT)["key"] == key
    wait_until(lambda: leases.holder(task_id) is None, "the lease released")
    assert int(redis.get(f"started:{key}")) == 1


def test_two_deliveries_of_a_run_once_message_at_once_in_one_process_commit_once(
    module_broker: PrivateBroker, shared: WorkerProcess, stack: Services, producer_options: Any
) -> None:
    """The same message (one lease token) delivered twice, both runs in flight on one loop.

    Both write inside their transaction; the completion row lets only the
    first commit through, and the other rolls back and reports the run done.
    """
    redis = redis_of(module_broker)
    key = new_key()
    task_id = f"pool-{key}"
    headers = {TOKEN_HEADER: uuid.uuid4().hex, TTL_HEADER: 600.0}
    message = Message(
        tasks_asyncio_pool.write_then_hold, (key, 1.0), {}, task_id, producer_options, headers
    )
    for _ in range(2):
        publish(celery_app, message)  # the one send path, without taking a lease
    wait_until(lambda: int(redis.get(f"started:{key}") or 0) == 2, "both deliveries started")

    def outcomes() -> list[str]:
        return [
            line["event"]
            for line in lines_of(shared, task_id)
            if line.get("event") in ("Task succeeded", SKIPPED)
        ]

    wait_until(lambda: outcomes().count("Task succeeded") == 2, "both deliveries ended")
    assert outcomes().count(SKIPPED) == 1
    rows = fetchval(stack, "SELECT count(*) FROM test_records WHERE key LIKE $1", f"{key}:%")
    assert rows == 1
    assert module_broker.app.AsyncResult(task_id).get(timeout=TIMEOUT)["status"] == "success"
    wait_until(lambda: task_id not in unacked_ids(redis), "both deliveries acknowledged")


# -- the circuit breaker, the metrics ------------------------------------------------


def test_a_circuit_breaker_is_one_per_process_across_its_interleaved_runs(
    module_broker: PrivateBroker, shared: WorkerProcess
) -> None:
    """Closed, open, half-open with one probe, closed: each state seen by 20 runs at once."""
    app, redis = module_broker.app, redis_of(module_broker)
    breaker = f"breaker-{new_key()}"

    def at_once(runs: int, *, fail: bool, seconds: float) -> Counter[str]:
        sent = [
            app.send_task("pool.guarded", kwargs={
                "key": str(n), "breaker": breaker, "fail": fail, "seconds": seconds,
            })
            for n in range(runs)
        ]  # fmt: skip
        done = [result.get(timeout=TIMEOUT) for result in sent]
        assert {run["pid"] for run in done} == {shared.pid}
        return Counter(run["outcome"] for run in done)

    def service_calls() -> int:
        return int(redis.get(f"executions:{breaker}:calls") or 0)

    # Closed: three runs that overlap all reach the failing service; the third failure opens it.
    assert at_once(tasks_asyncio_pool.BREAKER_THRESHOLD, fail=True, seconds=0.3) == {"failed": 3}
    opened = time.monotonic()
    assert service_calls() == 3
    # Open: every run fails fast, and none calls the service.
    assert at_once(20, fail=False, seconds=0.1) == {"open": 20}
    assert service_calls() == 3
    assert time.monotonic() - opened < tasks_asyncio_pool.BREAKER_RECOVERY, "still open"
    time.sleep(max(0.0, opened + tasks_asyncio_pool.BREAKER_RECOVERY + 0.2 - time.monotonic()))
    # Half-open: one run probes the service (for 2 s); the others, meanwhile, are refused.
    assert at_once(20, fail=False, seconds=2.0) == {"ok": 1, "open": 19}
    assert service_calls() == 4
    # The probe succeeded: closed, every run goes through.
    assert at_once(20, fail=False, seconds=0.1) == {"ok": 20}
    assert service_calls() == 24


def test_the_metrics_count_every_run_of_100_interleaved(private_broker: PrivateBroker) -> None:
    """60 succeed, 20 fail twice then succeed, 20 fail for good: all at once in one process."""
    app, prefix = private_broker.app, new_key()
    worker, port = start_serving_metrics(
        lambda port: asyncio_worker(
            private_broker, 100, env={"BACKGROUND_METRICS_PORT": str(port)}
        ).start()
    )
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        ok = [app.send_task("pool.sleep", kwargs={"key": f"ok{n}", "seconds": 0.5})
              for n in range(60)]  # fmt: skip
        retried = [app.send_task("pool.fails_twice", kwargs={"key": f"{prefix}-{n}"})
                   for n in range(20)]  # fmt: skip
        failed = [app.send_task("pool.fails", kwargs={"key": f"f{n}"}) for n in range(20)]
        assert all_overlapped([result.get(timeout=TIMEOUT) for result in ok])
        assert [result.get(timeout=TIMEOUT)["attempt"] for result in retried] == [2] * 20
        for result in failed:
            with pytest.raises(ValueError, match="refused"):
                result.get(timeout=TIMEOUT)
        samples = parse_metrics(http_get(url).decode())
    finally:
        worker.stop()

    def count(name: str, task: str) -> float:
        return metric(samples, name, task=task, queue="default")

    assert [
        (count(f"background_tasks_{what}_total", task), what, task)
        for task, what in itertools.product(
            ("pool.sleep", "pool.fails_twice", "pool.fails"),
            ("started", "succeeded", "retried", "failed"),
        )
    ] == [
        (60, "started", "pool.sleep"), (60, "succeeded", "pool.sleep"),
        (0, "retried", "pool.sleep"), (0, "failed", "pool.sleep"),
        (60, "started", "pool.fails_twice"), (20, "succeeded", "pool.fails_twice"),
        (40, "retried", "pool.fails_twice"), (0, "failed", "pool.fails_twice"),
        (20, "started", "pool.fails"), (0, "succeeded", "pool.fails"),
        (0, "retried", "pool.fails"), (20, "failed", "pool.fails"),
    ]  # fmt: skip
    for task in ("pool.sleep", "pool.fails_twice", "pool.fails"):
        assert count("background_tasks_in_flight", task) == 0, task
    assert metric(
        samples, "background_task_duration_seconds_count",
        task="pool.sleep", queue="default", outcome="success",
    ) == 60  # fmt: skip


# -- back-pressure, a queued revoke, warm shutdown ------------------------------------


def test_a_worker_takes_no_more_than_it_runs_skips_a_revoked_queued_task_and_stops_warm(
    private_broker: PrivateBroker,
) -> None:
    """Concurrency 3: 3 runs in flight, the rest stay in Redis; then a warm shutdown.

    A queued task revoked while it waits in Redis is skipped when the worker
    takes it; at SIGTERM the runs in flight finish, are acknowledged, and the
    worker exits.
    """
    app = private_broker.app
    redis = redis_of(private_broker)
    prefix = new_key()
    gate, last_gate = f"gate:{prefix}", f"gate:{prefix}:last"
    with asyncio_worker(private_broker, 3) as worker:
        held = [
            app.send_task("pool.gated", kwargs={"key": f"{prefix}-{i}", "gate": gate})
            for i in range(3)
        ]
        victim = app.send_task("pool.gated", kwargs={"key": f"{prefix}-victim", "gate": gate})
        queued = [
            app.send_task("pool.gated", kwargs={"key": f"{prefix}-q{i}", "gate": gate})
            for i in range(2)
        ]
        wait_until(
            lambda: all(redis.get(f"started:{prefix}-{i}") for i in range(3)), "3 runs started"
        )
        assert unacked_ids(redis) == {result.id for result in held}
        assert redis.llen("default") == 3  # the victim and the two others wait in Redis
        replies = app.control.revoke(victim.id, reply=True, timeout=10)
        assert replies, "the worker did not answer the revoke"

        redis.set(gate, 1)
        assert [result.get(timeout=TIMEOUT)["gate_open"] for result in held + queued] == [True] * 5
        wait_until(lambda: victim.state == "REVOKED", "the queued task revoked", timeout=10)
        assert redis.get(f"started:{prefix}-victim") is None

        # Warm shutdown with 3 runs in flight: they finish, then the worker exits.
        last = [
            app.send_task("pool.gated", kwargs={"key": f"{prefix}-l{i}", "gate": last_gate})
            for i in range(3)
        ]
        wait_until(
            lambda: all(redis.get(f"started:{prefix}-l{i}") for i in range(3)),
            "the last 3 runs started",
        )
        assert worker.process is not None
        worker.process.send_signal(signal.SIGTERM)
        wait_until(lambda: "worker: Warm shutdown" in worker.log(), "the warm shutdown began")
        redis.set(last_gate, 1)
        assert worker.process.wait(TIMEOUT) == 0
    assert [result.get(timeout=5)["gate_open"] for result in last] == [True] * 3
    assert unacked_ids(redis) == set()
    assert redis.llen("default") == 0


# -- a crash, a cold shutdown ----------------------------------------------------------


def test_kill_9_with_20_in_flight_all_come_back_and_complete(
    private_broker: PrivateBroker,
) -> None:
    """A crash: nothing was acknowledged; Redis delivers all 20 again after its visibility timeout.

    The workers include ``short_visibility`` (10 s visibility timeout, swept
    every second) so the redelivery takes seconds, not the production hour.
    """
    app = private_broker.app
    redis = redis_of(private_broker)
    prefix = new_key()
    keys = [f"{prefix}-{i}" for i in range(20)]
    first = asyncio_worker(private_broker, 20, include=(SHORT_VISIBILITY,)).start()
    try:
        results = [app.send_task("pool.mark", kwargs={"key": key, "seconds": 3.0}) for key in keys]
        wait_until(lambda: all(redis.get(f"started:{key}") for key in keys), "20 runs started")
        first.kill()
    finally:
        first.stop()
    assert not any(redis.get(f"completed:{key}") for key in keys)
    with asyncio_worker(private_broker, 20, include=(SHORT_VISIBILITY,)):
        done = [result.get(timeout=TIMEOUT) for result in results]
    assert sorted(run["key"] for run in done) == sorted(keys)
    assert [int(redis.get(f"completed:{key}") or 0) for key in keys] == [1] * 20
    assert [int(redis.get(f"started:{key}") or 0) for key in keys] == [2] * 20


def test_a_task_that_kills_its_process_runs_no_more_often_than_its_retry_policy_allows(
    private_broker: PrivateBroker, stack: Services
) -> None:
    """Each death of the whole process counts as an attempt: redelivered, not retried, yet bounded.

    The task (``long_running``: max_retries 2) kills its worker every time it
    runs. Workers are started one after another, each with a 2 s visibility
    timeout; each redelivery finds the run before it started and not ended.
    Without the count the broker would deliver it, and it would kill a
    worker, forever (the attempt number of a redelivered message never grows).
    """
    app = private_broker.app
    redis = redis_of(private_broker)
    key = new_key()
    result = app.send_task("pool.kill_own_process", kwargs={"key": key})
    env = {"TEST_VISIBILITY_TIMEOUT": "2"}
    workers_killed = 0
    for _ in range(6):
        worker = asyncio_worker(private_broker, 4, env=env, include=(SHORT_VISIBILITY,))
        try:
            died_starting = None
            try:
                worker.start()
            except WorkerStartError as exc:
                died_starting = str(exc)
            if died_starting is not None:
                # It took the message while starting, and died of it (SIGKILL: -9).
                assert "exited with -9" in died_starting
                workers_killed += 1
                continue
            assert worker.process is not None
            process = worker.process
            wait_until(
                lambda process=process: process.poll() is not None or result.state == "FAILURE",
                "the worker died or the task failed for good",
            )
            if result.state == "FAILURE":
                assert process.poll() is None, "the worker that failed it is alive"
                break
            workers_killed += 1
        finally:
            worker.stop()
    assert result.state == "FAILURE"
    assert type(result.result).__name__ == "TaskProcessLostError"
    assert "died 3 time(s)" in str(result.result)
    assert int(redis.get(f"runs:{key}")) == workers_killed == 3
    assert result.id not in unacked_ids(redis)
    letter = letter_of(stack, result.id)
    assert (letter.reason, letter.error_type) == ("worker lost", "TaskProcessLostError")
    assert letter.call() == ([], {"key": key})


def test_cold_shutdown_gives_the_runs_in_flight_back_to_the_broker(
    private_broker: PrivateBroker,
) -> None:
    """SIGQUIT with 20 in flight: none acknowledged nor retried; another worker runs each once."""
    app = private_broker.app
    redis = redis_of(private_broker)
    prefix = new_key()
    keys = [f"{prefix}-{i}" for i in range(20)]
    first = asyncio_worker(private_broker, 20).start()
    try:
        results = [app.send_task("pool.mark", kwargs={"key": key, "seconds": 5.0}) for key in keys]
        wait_until(lambda: all(redis.get(f"started:{key}") for key in keys), "20 runs started")
        assert first.process is not None
        first.process.send_signal(signal.SIGQUIT)
        first.process.wait(TIMEOUT)
    finally:
        first.stop()
    assert not any(redis.get(f"completed:{key}") for key in keys)
    # Given back at once (kombu restores unacknowledged messages at shutdown).
    assert redis.llen("default") == 20
    with asyncio_worker(private_broker, 20):
        done = [result.get(timeout=TIMEOUT) for result in results]
    assert sorted(run["key"] for run in done) == sorted(keys)
    assert [run["attempt"] for run in done] == [0] * 20  # given back, not retried
    assert [int(redis.get(f"completed:{key}") or 0) for key in keys] == [1] * 20
