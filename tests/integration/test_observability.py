"""Logs, metrics and Flower against a real prefork worker (concurrency 2) on Redis.

The worker gets broker, result and database URLs with passwords (a private
Redis server that requires one; PostgreSQL's trust authentication ignores it),
JSON logs, a metrics port and task events (``-E``). The private Redis server
also means that no other worker takes this module's tasks: every count is ours.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest

from app.core.background.internals.operations.worker_process import CELERY_APP, WorkerProcess
from tests.support.metrics import http_get, metric, parse_metrics, start_serving_metrics
from tests.support.redis_server import RedisServer, free_port
from tests.support.services import Services, unavailable

# The module's run (first test): Redis 75 + up to 3 worker starts x (60 + 10) +
# up to 3 Flower starts x 30 + 30 + 30 + client 90 + stops 40 = 565 s of its own
# waits at worst, above the global 120.
pytestmark = [pytest.mark.redis, pytest.mark.postgres, pytest.mark.timeout(660)]

REDIS_PASSWORD = "redis-secret-pw"
DB_PASSWORD = "db-secret-pw"
ARG_SECRET = "argument-secret-value"


def wait_for(condition: Any, what: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = condition()
        except (OSError, urllib.error.URLError, ValueError, KeyError):
            value = None
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


CLIENT_SCRIPT = f"""
import json
import uuid
from tests.support.tasks_observability import (
    bad_uuid, duplicate, fail, flaky, missing, ok, rendezvous,
)

sent = {{
    "ok0": ok.delay(0, secret={ARG_SECRET!r}),
    "ok1": ok.delay(1, secret={ARG_SECRET!r}),
    "ok2": ok.delay(2, secret={ARG_SECRET!r}),
    "fail": fail.delay(secret={ARG_SECRET!r}),
    "bad_uuid": bad_uuid.delay({ARG_SECRET!r}),
    "missing": missing.delay({ARG_SECRET!r}),
    "duplicate": duplicate.delay({ARG_SECRET!r} + uuid.uuid4().hex),
    "flaky": flaky.delay("k"),
    "meet0": rendezvous.delay("m", 2),
    "meet1": rendezvous.delay("m", 2),
}}
results = {{}}
for key, result in sent.items():
    try:
        results[key] = result.get(timeout=20)
    except Exception as exc:
        results[key] = {{"error_type": type(exc).__name__}}
print(json.dumps({{"ids": {{k: r.id for k, r in sent.items()}}, "results": results}}))
"""


@contextmanager
def private_redis(password: str) -> Iterator[str]:
    """A Redis server of this module's own, with a password: nothing else consumes from it."""
    try:
        server = RedisServer(password=password).start()
    except (FileNotFoundError, RuntimeError) as exc:
        unavailable(str(exc))
    try:
        yield server.url()
    finally:
        server.close()


@dataclass
class Run:
    worker: WorkerProcess
    metrics_url: str
    flower_url: str | None
    flower_error: str | None
    results: dict[str, Any] = field(default_factory=dict)
    task_ids: dict[str, str] = field(default_factory=dict)

    def log_records(self) -> list[dict[str, Any]]:
        records = []
        for line in self.worker.log().splitlines():
            if line.startswith("{"):
                records.append(json.loads(line))
        return records


PORT_ATTEMPTS = 3


def start_worker_with_metrics(env: dict[str, str]) -> tuple[WorkerProcess, int]:
    return start_serving_metrics(
        lambda port: WorkerProcess(
            {**env, "BACKGROUND_METRICS_PORT": str(port)},
            include=["tests.support.tasks_observability"],
            extra_args=["-E"],
        ).start()
    )


def start_flower(env: dict[str, str]) -> tuple[subprocess.Popen[bytes], str]:
    """Flower on a free port; on another one if it exits at once (its port was taken)."""
    for _ in range(PORT_ATTEMPTS):
        port = free_port()
        flower = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", CELERY_APP, "flower",
             f"--port={port}", "--address=127.0.0.1"],
            env={**os.environ, **env, "FLOWER_UNAUTHENTICATED_API": "true"},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while flower.poll() is None and time.monotonic() < deadline:
            try:
                if http_get(f"{url}/healthcheck") == b"OK":
                    return flower, url
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.1)
        if flower.poll() is None:
            return flower, url  # running but not answering: the caller's wait reports it
    raise AssertionError(f"Flower exited at start {PORT_ATTEMPTS} times")


@pytest.fixture(scope="module")
def run(stack: Services) -> Iterator[Run]:
    with private_redis(REDIS_PASSWORD) as redis_url:
        yield from _run(stack, redis_url)


def _run(stack: Services, redis_url: str) -> Iterator[Run]:
    database_url = stack.postgres_url.replace("postgres@", f"postgres:{DB_PASSWORD}@", 1)
    assert DB_PASSWORD in database_url
    env = {
        "CELERY_BROKER_URL": redis_url,
        "CELERY_RESULT_BACKEND": redis_url,
        "DATABASE_URL": database_url,
        "LOG_FORMAT": "json",
        "BACKGROUND_METRICS_HOST": "127.0.0.1",
    }
    worker, metrics_port = start_worker_with_metrics(env)
    flower, flower_url, flower_error = None, None, None
    try:
        try:
            flower, flower_url = start_flower(env)
            wait_for(lambda: http_get(f"{flower_url}/healthcheck") == b"OK", "Flower")
            # Flower shows tasks from events it receives: wait until it sees the worker.
            wait_for(lambda: json.loads(http_get(f"{flower_url}/api/workers?refresh=1")), "worker")
        except AssertionError as exc:
            flower_error = str(exc)

        # Tasks are sent by a separate process configured like an application on
        # the private Redis (this process's app points at the session's broker).
        client = subprocess.run(
            [sys.executable, "-c", CLIENT_SCRIPT],
            env={**os.environ, **env}, capture_output=True, text=True, timeout=90,
        )  # fmt: skip
        assert client.returncode == 0, f"{client.stderr[-3000:]}\n{worker.log()[-3000:]}"
        report = json.loads(client.stdout.strip().splitlines()[-1])
        current = Run(worker, f"http://127.0.0.1:{metrics_port}/metrics", flower_url, flower_error)
        current.task_ids = report["ids"]
        current.results = report["results"]
        yield current
    finally:
        if flower is not None:
            flower.terminate()
            flower.wait(10)
        worker.stop()


def test_tasks_ran(run: Run) -> None:
    assert run.results["ok1"]["n"] == 1
    assert run.results["flaky"] == "ok"
    assert run.results["fail"] == {"error_type": "TaskValidationError"}
    # The two rendezvous runs were in the pool at the same time: one per child.
    assert run.results["meet0"] != run.results["meet1"]


def test_every_task_record_carries_the_task_fields(run: Run) -> None:
    records = [r for r in run.log_records() if r.get("logger") == "app.tasks"]
    assert records
    for record in records:
        assert {"task_id", "task_name", "queue", "attempt", "timestamp", "level"} <= record.keys()
    last_lines = ("Task succeeded", "Task failed", "Task failed, will retry")
    ends = [r for r in records if r["event"] in last_lines]
    for record in ends:
        assert isinstance(record["duration"], float)
        assert record["outcome"] in ("success", "failure", "retry")
    working = next(r for r in records if r["event"] == "Working" and r["n"] == 1)
    assert working["task_id"] == run.task_ids["ok1"]
    assert working["queue"] == "default"
    assert working["attempt"] == 0


def test_framework_logs_retry_with_delay_and_reason(run: Run) -> None:
    flaky = [r for r in run.log_records() if r.get("task_id") == run.task_ids["flaky"]]
    retry = next(r for r in flaky if r["event"] == "Task failed, will retry")
    assert retry["retry_in"] > 0
    assert retry["error_type"] == "ConnectionError"
    assert retry["attempt"] == 0
    success = next(r for r in flaky if r["event"] == "Task succeeded")
    assert success["attempt"] == 1


def outcome_lines(run: Run, task_id: str) -> list[dict[str, Any]]:
    """The lines that report how a run ended: the framework's and Celery's own."""
    celery_outcomes = ("succeeded in", "raised unexpected", "raised expected", "retry: Retry in")
    return [
        r
        for r in run.log_records()
        if r.get("task_id") == task_id
        and (
            r["event"] in ("Task succeeded", "Task failed", "Task failed, will retry")
            or any(words in r["event"] for words in celery_outcomes)
        )
    ]


@pytest.mark.parametrize("key", ["fail", "bad_uuid", "missing", "duplicate"])
def test_an_expected_failure_is_logged_once(run: Run, key: str) -> None:
    # The client cannot rebuild an IntegrityError (its constructor needs arguments).
    expected = ("TaskValidationError", "TaskNotFoundError", "Exception")
    assert run.results[key]["error_type"] in expected, run.results[key]
    lines = outcome_lines(run, run.task_ids[key])
    # One line, the framework's, with its traceback: not Celery's "raised ..." too.
    assert [(r["event"], r["level"]) for r in lines] == [("Task failed", "error")], lines
    assert lines[0]["reason"] == "non-retriable"
    assert "Traceback" in lines[0]["exception"]


def test_a_retry_then_a_success_is_one_line_each(run: Run) -> None:
    lines = outcome_lines(run, run.task_ids["flaky"])
    events = [r["event"] for r in lines]
    assert events == ["Task failed, will retry", "Task succeeded"], lines


def test_a_rejected_value_is_named_by_its_field_not_shown(run: Run) -> None:
    failed = next(r for r in outcome_lines(run, run.task_ids["bad_uuid"]))
    assert failed["error"] == "entity_id is not a valid UUID (field='entity_id', value_type='str')"


def _positions(text: str, word: str) -> list[int]:
    found, start = [], text.find(word)
    while start != -1:
        found.append(start)
        start = text.find(word, start + 1)
    return found


def test_no_password_and_no_argument_in_the_worker_output(run: Run) -> None:
    output = run.worker.log()
    connected = [line for line in output.splitlines() if "Connected to " in line]
    assert connected
    assert all(":***@127.0.0.1" in line for line in connected)
    assert ":**@" in output  # Celery's banner masks the transport and results URLs
    for secret in (REDIS_PASSWORD, DB_PASSWORD, ARG_SECRET):
        # Each place it appears, with some context: which line, which field.
        leaks = [output[max(i - 300, 0) : i + 60] for i in _positions(output, secret)]
        assert not leaks, "\n---\n".join(leaks)


def test_metrics_endpoint_counts_the_pools_tasks(run: Run) -> None:
    samples = parse_metrics(http_get(run.metrics_url).decode())

    def count(name: str, task: str) -> float:
        return metric(samples, name, task=task, queue="default")

    assert count("background_tasks_started_total", "obs.ok") == 3
    assert count("background_tasks_succeeded_total", "obs.ok") == 3
    assert count("background_tasks_started_total", "obs.rendezvous") == 2
    assert count("background_tasks_succeeded_total", "obs.rendezvous") == 2
    assert count("background_tasks_failed_total", "obs.fail") == 1
    assert count("background_tasks_started_total", "obs.flaky") == 2
    assert count("background_tasks_retried_total", "obs.flaky") == 1
    assert count("background_tasks_succeeded_total", "obs.flaky") == 1
    assert count("background_tasks_in_flight", "obs.ok") == 0
    assert metric(
        samples, "background_task_duration_seconds_count",
        task="obs.ok", queue="default", outcome="success",
    ) == 3  # fmt: skip


def test_flower_lists_the_worker_and_a_finished_task(run: Run) -> None:
    if run.flower_error:
        pytest.fail(f"Flower did not start or see the worker: {run.flower_error}")
    workers = json.loads(http_get(f"{run.flower_url}/api/workers?refresh=1"))
    assert any(name.startswith(run.worker.name.split("@")[0]) for name in workers)
    task_id = run.task_ids["ok0"]

    def finished() -> dict[str, Any] | None:
        info = json.loads(http_get(f"{run.flower_url}/api/task/info/{task_id}"))
        return info if info.get("state") == "SUCCESS" else None

    info = wait_for(finished, "Flower to see the task succeed")
    assert info["name"] == "obs.ok"


def test_api_metrics_count_dispatches(stack: Services) -> None:
    import httpx

    from app.main import create_app
    from tests.support.tasks_observability import ok

    app = create_app()

    async def scrape() -> str:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as http:
            response = await http.get("/metrics")
        assert response.status_code == 200
        return response.text

    import asyncio

    before = metric(parse_metrics(asyncio.run(scrape())), "background_tasks_dispatched_total",
                    task="obs.ok", queue="default")  # fmt: skip
    ok.delay(5)
    ok.apply_async((6,), queue="default")
    after = metric(parse_metrics(asyncio.run(scrape())), "background_tasks_dispatched_total",
                   task="obs.ok", queue="default")  # fmt: skip
    assert after - before == 2


# Its own waits: two API starts 2 x 60 s, requests and stops: about 160 s.
@pytest.mark.timeout(240)
def test_api_metrics_sum_every_api_process(stack: Services, tmp_path: Any) -> None:
    """Two API processes (uvicorn) share PROMETHEUS_MULTIPROC_DIR, as ``--workers 2`` do.

    One dispatches 2 notifications, the other 3; each one's ``/metrics`` says 5,
    which neither dispatched alone.
    """
    import uuid

    import httpx

    from tests.reliability.test_security import Api

    class MetricsApi(Api):
        def ready(self) -> bool:  # /health waits for a worker; none is needed here
            try:
                return httpx.get(f"{self.base}/metrics", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

    folder = tmp_path / "api-metrics"
    folder.mkdir()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(folder)}
    apis = [MetricsApi(env), MetricsApi(env)]
    try:
        for api in apis:
            assert api.wait_ready(60), api.log()[-3000:]
        assert apis[0].process.pid != apis[1].process.pid
        for api, count in zip(apis, (2, 3), strict=True):
            for _ in range(count):
                body = {"user_id": str(uuid.uuid4()), "message": "hello"}
                response = httpx.post(f"{api.base}/notifications", json=body, timeout=30)
                assert response.status_code == 202, response.text
        for api in apis:
            samples = parse_metrics(httpx.get(f"{api.base}/metrics", timeout=30).text)
            name = "background_tasks_dispatched_total"
            task = "notifications.send_notification"
            dispatched = metric(samples, name, task=task, queue="default")
            assert dispatched == 5, api.log()[-3000:]
    finally:
        for api in apis:
            api.stop()
