"""Celery's own per-task lines for framework tasks, on real workers of every pool.

A framework task's run ends with the framework's line (``Task succeeded``), so
its tracer is built without Celery's success record (not built and then
dropped), and Celery's "received" line is at DEBUG unless
``BACKGROUND_LOG_RECEIVED=true``. A plain Celery task of the same app keeps
both. ``tests/support/task_lines_probe.py`` prints a marker for every success
record Celery builds; its plain task shows the probe sees them.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery

from app.core.background.celery_app import build_celery_config
from app.core.background.internals.operations.worker_process import WorkerProcess
from app.core.config import Settings
from tests.support.redis_server import RedisServer
from tests.support.services import Services
from tests.support.task_lines_probe import MARKER

pytestmark = [pytest.mark.redis]

POOL_PATH = "app.core.background.pool:AsyncioPool"
PROBE = "tests.support.task_lines_probe"
TIMEOUT = 30


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    with RedisServer(durable=True) as redis_server:
        yield redis_server


@contextlib.contextmanager
def running(
    stack: Services, url: str, monkeypatch: pytest.MonkeyPatch, pool: str, **env: str
) -> Iterator[tuple[Celery, WorkerProcess]]:
    """A worker on ``url`` (the probe included), and a client app that sends to it."""
    # Celery prefers these variables to any configuration (conftest.claimed_broker).
    monkeypatch.setenv("CELERY_BROKER_URL", url)
    monkeypatch.setenv("CELERY_RESULT_BACKEND", url)
    app = Celery("task-lines-client", set_as_current=False)
    app.conf.update(build_celery_config(Settings(celery_broker_url=url, celery_result_backend=url)))
    extra = {"CELERY_CUSTOM_WORKER_POOL": POOL_PATH} if pool == "custom" else {}
    process = WorkerProcess(
        {"CELERY_BROKER_URL": url, "CELERY_RESULT_BACKEND": url, "LOG_FORMAT": "json",
         "DATABASE_URL": stack.postgres_url, **extra, **env},
        pool=pool, concurrency=2, include=[PROBE],
    )  # fmt: skip
    try:
        with process:
            yield app, process
    finally:
        app.close()


def run_both(app: Celery, process: WorkerProcess, n: int) -> tuple[str, str]:
    """A framework task and a plain Celery task, each to its end; their ids."""
    framework = app.send_task("probe.framework", kwargs={"n": n})
    plain = app.send_task("probe.plain", kwargs={"n": n})
    try:
        assert framework.get(timeout=TIMEOUT) == n
        assert plain.get(timeout=TIMEOUT) == n
    except Exception as exc:
        raise AssertionError(f"{exc!r}\n{process.log()[-3000:]}") from exc
    return framework.id, plain.id


def wait_for_lines(process: WorkerProcess, text: str, count: int = 1) -> str:
    """The worker's log once ``text`` is in it ``count`` times (a plain task's success
    line is written after its result is stored)."""
    deadline = time.monotonic() + TIMEOUT
    while (log := process.log()).count(text) < count:
        assert time.monotonic() < deadline, f"not {count} x {text!r}:\n{log[-3000:]}"
        time.sleep(0.05)
    return log


def records(process: WorkerProcess) -> list[dict[str, Any]]:
    return [json.loads(line) for line in process.log().splitlines() if line.startswith("{")]


def events_of(process: WorkerProcess, task_id: str) -> list[str]:
    return [str(r["event"]) for r in records(process) if r.get("task_id") == task_id]


@pytest.mark.parametrize("pool", ["prefork", "custom", "solo", "threads"])
def test_a_framework_task_has_its_own_line_and_no_celery_success_record(
    stack: Services, server: RedisServer, monkeypatch: pytest.MonkeyPatch, pool: str
) -> None:
    with running(stack, server.url(1), monkeypatch, pool) as (app, process):
        framework_id, plain_id = run_both(app, process, 1)
        log = wait_for_lines(process, f"Task probe.plain[{plain_id}] succeeded in")
        framework, plain = events_of(process, framework_id), events_of(process, plain_id)
    # The probe sees Celery's success records: the plain task's is built.
    assert f"{MARKER} probe.plain" in log
    assert any("succeeded in" in event for event in plain), plain
    assert f"Task probe.plain[{plain_id}] received" in plain
    # The framework task: its own line, no success record built, no received line at INFO.
    assert f"{MARKER} probe.framework" not in log
    assert framework == ["Task succeeded"], framework


@pytest.mark.parametrize("setting", ["BACKGROUND_LOG_RECEIVED", "BACKGROUND_LOG_TASK_ARGUMENTS"])
def test_the_received_line_comes_back_with_its_setting(
    stack: Services, server: RedisServer, monkeypatch: pytest.MonkeyPatch, setting: str
) -> None:
    """Either setting: the arguments' opt-in shows them in the received line."""
    with running(stack, server.url(2), monkeypatch, "prefork", **{setting: "true"}) as (
        app,
        process,
    ):
        framework_id, _ = run_both(app, process, 2)
        framework = events_of(process, framework_id)
    assert framework == [f"Task probe.framework[{framework_id}] received", "Task succeeded"]


@pytest.mark.parametrize("pool", ["custom", "solo"])
def test_the_tracers_stay_quiet_after_the_broker_comes_back(
    stack: Services, server: RedisServer, monkeypatch: pytest.MonkeyPatch, pool: str
) -> None:
    """Celery rebuilds every tracer when its consumer restarts (a lost broker connection)."""
    with running(stack, server.url(3), monkeypatch, pool) as (app, process):
        run_both(app, process, 3)
        server.restart(down_for=1.0)
        wait_for_lines(process, '"Connected to ', count=2)  # the consumer restarted
        framework_id, plain_id = run_both(app, process, 4)
        log = wait_for_lines(process, f"Task probe.plain[{plain_id}] succeeded in")
        framework = events_of(process, framework_id)
    assert log.count(f"{MARKER} probe.plain") == 2, log[-3000:]
    assert f"{MARKER} probe.framework" not in log
    assert framework == ["Task succeeded"], framework
