"""Worker start-up and pools: discovery errors, refused pools, -Q, solo and threads."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from app.core.background.internals.operations.worker_process import WorkerProcess, WorkerStartError
from tests.conftest import TEST_TASK_MODULES, PrivateBroker
from tests.support.db import fetchval
from tests.support.services import Services

TIMEOUT = 60


def test_a_broken_tasks_module_stops_the_worker_naming_the_file(stack: Services) -> None:
    worker = WorkerProcess({}, include=["tests.support.broken.tasks"])
    with pytest.raises(WorkerStartError) as raised:
        worker.start()
    message = str(raised.value)
    assert "cannot import task module 'tests.support.broken.tasks'" in message
    assert "tests/support/broken/tasks.py" in message
    assert "this module is broken on purpose" in message


def test_gevent_pool_is_refused_with_a_clear_message(stack: Services) -> None:
    worker = WorkerProcess({}, pool="gevent")
    with pytest.raises(WorkerStartError) as raised:
        worker.start()
    assert "gevent' pool is not supported" in str(raised.value)


@pytest.mark.parametrize("pool", ["gevent", "eventlet", "celery.concurrency.gevent:TaskPool"])
def test_green_pools_are_refused_before_the_worker_starts(pool: str) -> None:
    from app.core.background.celery_app import refuse_unsafe_pools

    with pytest.raises(SystemExit, match="pool is not supported"):
        refuse_unsafe_pools(conf={}, options={"pool_cls": pool})
    refuse_unsafe_pools(conf={}, options={"pool_cls": "prefork"})


def test_worker_restricted_to_one_queue_consumes_only_that_queue(
    private_broker: PrivateBroker,
) -> None:
    app = private_broker.app
    with WorkerProcess(
        private_broker.env, queues=["high_priority"], include=TEST_TASK_MODULES
    ) as worker:
        # Routed by the framework's router, as a producer would send them.
        later = app.send_task("tests.later", queue="low_priority")
        default = app.send_task("tests.where_am_i", queue="default")
        urgent = app.send_task("tests.urgent", queue="high_priority")
        assert urgent.get(timeout=TIMEOUT) == "high_priority"
        assert f"tests.where_am_i[{default.id}]" not in worker.log()
        assert not later.ready()
        assert not default.ready()
    broker = app.connection_for_write().default_channel.client
    assert broker.llen("default") == 1
    assert broker.llen("low_priority") == 1


def test_worker_without_queues_consumes_all_three(private_broker: PrivateBroker) -> None:
    app = private_broker.app
    with WorkerProcess(private_broker.env, include=TEST_TASK_MODULES):
        for name, queue in [
            ("tests.urgent", "high_priority"),
            ("tests.where_am_i", "default"),
            ("tests.later", "low_priority"),
        ]:
            assert app.send_task(name, queue=queue).get(timeout=TIMEOUT) == queue


@pytest.mark.parametrize(("pool", "concurrency"), [("solo", 1), ("threads", 4)])
def test_db_tasks_on_solo_and_threads_pools_with_asyncpg(
    private_broker: PrivateBroker, stack: Services, pool: str, concurrency: int
) -> None:
    app = private_broker.app
    prefix = f"{pool}-{uuid.uuid4().hex}"
    with WorkerProcess(
        private_broker.env, pool=pool, concurrency=concurrency, include=TEST_TASK_MODULES
    ) as worker:
        results = [
            app.send_task("tests.record", kwargs={"key": f"{prefix}-{i}"}) for i in range(300)
        ]
        for result in results:
            result.get(timeout=TIMEOUT)
        pids = fetchval(
            stack,
            "SELECT array_agg(DISTINCT worker_pid) FROM test_records WHERE key LIKE $1",
            f"{prefix}-%",
        )
        assert pids == [worker.pid]  # solo and threads run tasks in the worker process
        log = worker.log()
    count = fetchval(stack, "SELECT count(*) FROM test_records WHERE key LIKE $1", f"{prefix}-%")
    assert count == 300
    for trap in ("attached to a different loop", "another operation is in progress", "ERROR"):
        assert trap not in log


@pytest.mark.parametrize(
    ("pool", "concurrency", "implementation"),
    [
        ("prefork", 1, "celery.concurrency.prefork:TaskPool"),
        ("asyncio", 8, "app.core.background.internals.asyncio_pool:AsyncioPool"),
    ],
)
def test_worker_script_starts_small_workers_and_stops_them_all(
    private_broker: PrivateBroker, tmp_path: Path, pool: str, concurrency: int, implementation: str
) -> None:
    """``scripts/worker.sh`` on Redis: WORKERS workers of WORKER_POOL, one SIGTERM ends all.

    Prefork workers have concurrency 1; asyncio workers CONCURRENCY each.
    """
    script = Path(__file__).resolve().parents[2] / "scripts" / "worker.sh"
    env = {
        **os.environ, **private_broker.env, "WORKERS": "2", "WORKER_POOL": pool,
        "CONCURRENCY": str(concurrency),
    }  # fmt: skip
    log = (tmp_path / "workers.log").open("wb")
    process = subprocess.Popen(
        ["bash", str(script), "--without-gossip", "--without-mingle"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        control = private_broker.app.control
        deadline = time.monotonic() + TIMEOUT
        stats: dict[str, Any] = {}
        while len(stats) < 2 and time.monotonic() < deadline:
            stats = control.inspect(timeout=1).stats() or {}
        log.flush()
        assert len(stats) == 2, (tmp_path / "workers.log").read_text()[-3000:]
        assert sorted(name.split("@")[0] for name in stats) == ["worker1", "worker2"]
        assert {s["pool"]["max-concurrency"] for s in stats.values()} == {concurrency}
        assert {s["pool"]["implementation"] for s in stats.values()} == {implementation}
        process.send_signal(signal.SIGTERM)
        assert process.wait(TIMEOUT) == 0
        assert not control.inspect(timeout=1).ping()
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        log.close()


def test_worker_script_refuses_a_hostname_it_would_give_every_worker() -> None:
    script = Path(__file__).resolve().parents[2] / "scripts" / "worker.sh"
    env = {**os.environ, "CELERY_BROKER_URL": "redis://127.0.0.1:1/0"}
    done = subprocess.run(
        ["bash", str(script), "-n", "mine@%h"], env=env, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 2
    assert "drop -n" in done.stderr


def test_worker_script_refuses_a_pool_it_does_not_know() -> None:
    script = Path(__file__).resolve().parents[2] / "scripts" / "worker.sh"
    env = {**os.environ, "CELERY_BROKER_URL": "redis://127.0.0.1:1/0", "WORKER_POOL": "gevent"}
    command = ["bash", str(script)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert "WORKER_POOL must be prefork or asyncio" in done.stderr


def test_worker_script_fails_when_its_workers_cannot_start(private_broker: PrivateBroker) -> None:
    script = Path(__file__).resolve().parents[2] / "scripts" / "worker.sh"
    env = {**os.environ, **private_broker.env, "WORKERS": "2"}
    done = subprocess.run(
        ["bash", str(script), "--pool-does-not-exist"],
        env=env, capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip
    assert done.returncode != 0


def test_a_refused_database_login_fails_at_once_with_the_databases_message(
    private_broker: PrivateBroker, stack: Services
) -> None:
    host = stack.postgres_url.split("@", 1)[1]
    env = {
        **private_broker.env,
        "DATABASE_URL": f"postgresql+asyncpg://nosuchrole:db-secret-pw@{host}",
        "LOG_FORMAT": "json",
    }
    with WorkerProcess(env, include=TEST_TASK_MODULES) as worker:
        result = private_broker.app.send_task("tests.record", kwargs={"key": uuid.uuid4().hex})
        with pytest.raises(Exception, match="nosuchrole"):
            result.get(timeout=TIMEOUT)
        log = worker.log()
    assert 'role \\"nosuchrole\\" does not exist' in log  # the database's own words
    assert "will retry" not in log
    assert log.count('"reason": "non-retriable"') == 1
    assert "db-secret-pw" not in log


# -- the log level: LOG_LEVEL unless -l/--loglevel is given ---------------------


def _task_lines(worker: WorkerProcess, task_id: str) -> list[str]:
    """The worker's log lines about one task (its id is in each of them)."""
    return [line for line in worker.log().splitlines() if task_id in line]


def _wait_for_line(worker: WorkerProcess, task_id: str, text: str) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if any(text in line for line in _task_lines(worker, task_id)):
            return
        time.sleep(0.1)
    raise AssertionError(f"no {text!r} line for {task_id}:\n{worker.log()[-4000:]}")


@pytest.mark.parametrize("pool", ["prefork", "solo"])
def test_a_worker_started_without_loglevel_logs_at_log_level(
    private_broker: PrivateBroker, pool: str
) -> None:
    """``celery -A app.core.background.celery_app worker`` as the README shows it: no -l."""
    env = {**private_broker.env, "LOG_LEVEL": "DEBUG"}
    worker = WorkerProcess(env, pool=pool, loglevel=None, include=TEST_TASK_MODULES)
    assert not {"-l", "--loglevel"} & set(worker.command)
    # Celery's default level (WARNING) would hide even its " ready." line.
    with worker:
        result = private_broker.app.send_task("tests.where_am_i", queue="default")
        assert result.get(timeout=TIMEOUT) == "default"
        _wait_for_line(worker, result.id, "Task succeeded")
        # DEBUG, from LOG_LEVEL: the framework's "started" line is there too.
        assert any("Task started" in line for line in _task_lines(worker, result.id))


def test_an_explicit_loglevel_wins_over_log_level(private_broker: PrivateBroker) -> None:
    env = {**private_broker.env, "LOG_LEVEL": "DEBUG"}
    with WorkerProcess(env, loglevel="INFO", include=TEST_TASK_MODULES) as worker:
        result = private_broker.app.send_task("tests.where_am_i", queue="default")
        assert result.get(timeout=TIMEOUT) == "default"
        _wait_for_line(worker, result.id, "Task succeeded")
        assert not any("Task started" in line for line in _task_lines(worker, result.id))
