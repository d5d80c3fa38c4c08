"""OpenTelemetry tracing across real processes: the API, the outbox relay and a prefork worker.

Each process runs with ``OTEL_TRACES_EXPORTER=file``: its spans are appended,
one JSON object per line, to one file of this module's. The test sends HTTP
requests with a ``traceparent`` of its own (so it knows each trace's id) to
an API (``uvicorn tests.support.tracing_app:app``) whose endpoints send a task
by each send path, then reads the spans and follows every run span's parents
up to the request's server span: one trace, no missing link.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from app.core.background.internals.operations.worker_process import WorkerProcess
from tests.conftest import PrivateBroker
from tests.support.redis_server import free_port
from tests.support.services import Services, private_database

# Start-up of the worker and the API (~10 s) and the tasks (a few seconds): 180 s at worst.
pytestmark = [pytest.mark.redis, pytest.mark.postgres, pytest.mark.timeout(180)]

OPERATOR_PASSWORD = "tracing-operator-pw"
WAIT = 30.0


@dataclass
class Stack:
    env: dict[str, str]
    spans_file: Path
    api_url: str
    worker: WorkerProcess

    def spans(self) -> list[dict[str, Any]]:
        if not self.spans_file.exists():
            return []
        return [json.loads(line) for line in self.spans_file.read_text().splitlines() if line]

    def post(self, path: str, traceparent: str, **headers: str) -> Any:
        request = urllib.request.Request(
            self.api_url + path, method="POST", headers={"traceparent": traceparent, **headers}
        )
        with urllib.request.urlopen(request, timeout=15) as response:
            return json.loads(response.read())


def new_traceparent() -> tuple[str, str, str]:
    """(traceparent, trace id, span id) of a client span of the test's own."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


def wait_for(condition: Any, what: str, timeout: float = WAIT) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def start_api(env: dict[str, str]) -> tuple[subprocess.Popen[bytes], str, Path]:
    port = free_port()
    log = Path(env["BACKGROUND_TRACE_FILE"]).with_name("api.log")
    with log.open("wb") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "tests.support.tracing_app:app",
             "--host", "127.0.0.1", "--port", str(port)],
            env={**os.environ, **env},
            stdout=output,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"the API exited:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url + "/metrics", timeout=2):
                return True
        except OSError:
            return False

    wait_for(answers, "the API to answer")
    return process, url, log


# The worker's pools: tracing starts in each prefork pool process (after the fork),
# or in the worker's own process for the asyncio pool (runs in greenlets on one loop).
POOLS = {
    "prefork": {"pool": "prefork", "concurrency": 2},
    "asyncio": {"pool": "custom", "concurrency": 8},
}


@pytest.fixture(scope="module", params=sorted(POOLS))
def traced(
    request: pytest.FixtureRequest,
    stack: Services,
    module_broker: PrivateBroker,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    spans_file = tmp_path_factory.mktemp("tracing") / "spans.jsonl"
    with private_database(stack) as (database_url, _dsn):
        env = {
            **module_broker.env,
            "DATABASE_URL": database_url,
            "LOG_FORMAT": "json",
            "OTEL_TRACES_EXPORTER": "file",
            "BACKGROUND_TRACE_FILE": str(spans_file),
            # Spans are written within 50 ms of their end, not 5 s.
            "OTEL_BSP_SCHEDULE_DELAY": "50",
            "OPERATIONS_PASSWORD": OPERATOR_PASSWORD,
        }
        worker_env = {**env, "CELERY_CUSTOM_WORKER_POOL": "app.core.background.pool:AsyncioPool"}
        with WorkerProcess(
            worker_env, include=["tests.support.tasks_tracing"], **POOLS[request.param]
        ) as worker:
            api, url, _log = start_api(env)
            try:
                yield Stack(env, spans_file, url, worker)
            finally:
                api.terminate()
                api.wait(15)


# -- reading the spans ------------------------------------------------------------------


def run_spans(spans: list[dict[str, Any]], task_id: str) -> list[dict[str, Any]]:
    """The worker's spans of ``task_id``'s runs, in attempt order."""
    runs = [
        span
        for span in spans
        if span["kind"] == "CONSUMER" and span["attributes"].get("messaging.message.id") == task_id
    ]
    return sorted(runs, key=lambda span: span["attributes"].get("background.attempt", 0))


def finished_run(stack: Stack, task_id: str, outcome: str = "success") -> dict[str, Any]:
    def found() -> dict[str, Any] | None:
        runs = [
            run
            for run in run_spans(stack.spans(), task_id)
            if run["attributes"].get("background.outcome") == outcome
        ]
        return runs[-1] if runs else None

    run: dict[str, Any] = wait_for(found, f"the {outcome} run span of {task_id}")
    return run


def ancestors(spans: list[dict[str, Any]], span: dict[str, Any]) -> list[dict[str, Any]]:
    """``span``'s parents up to its trace's first span of ours; every link must be there."""
    by_id = {s["span_id"]: s for s in spans}
    chain = []
    while span["parent_span_id"] in by_id:
        span = by_id[span["parent_span_id"]]
        chain.append(span)
    return chain


def assert_one_trace(
    stack: Stack, task_id: str, trace_id: str, client_span: str, *, via: str = "app-api"
) -> dict[str, Any]:
    """The run of ``task_id`` is in the request's trace, under its publish and server spans."""
    run = finished_run(stack, task_id)
    spans = stack.spans()
    assert run["trace_id"] == trace_id
    assert run["service"] == "app-worker"
    chain = ancestors(spans, run)
    publish = chain[0]
    assert publish["kind"] == "PRODUCER", publish
    assert publish["attributes"]["messaging.message.id"] == task_id
    assert publish["service"] == via
    server = chain[-1]
    # The top of the chain is the API's request span, whose parent is the test's span.
    assert server["kind"] == "SERVER", chain
    assert server["service"] == "app-api"
    assert server["parent_span_id"] == client_span
    assert {span["trace_id"] for span in chain} == {trace_id}
    # The messaging conventions and the framework's attributes on the run span.
    attributes = run["attributes"]
    assert attributes["messaging.system"] == "redis"
    assert attributes["messaging.destination.name"] == "default"
    assert attributes["messaging.operation.type"] == "process"
    assert attributes["background.outcome"] == "success"
    assert "background.policy" in attributes
    assert "background.attempt" in attributes
    return run


def sql_children(stack: Stack, run: dict[str, Any]) -> list[dict[str, Any]]:
    def found() -> list[dict[str, Any]]:
        return [
            span
            for span in stack.spans()
            if span["parent_span_id"] == run["span_id"]
            and span["kind"] == "CLIENT"
            and span["attributes"].get("db.system", span["attributes"].get("db.system.name"))
            == "postgresql"
        ]

    children: list[dict[str, Any]] = wait_for(found, "the run's SQL spans")
    assert {span["trace_id"] for span in children} == {run["trace_id"]}
    return children


def statements(spans: list[dict[str, Any]]) -> str:
    return " ".join(
        str(span["attributes"].get("db.statement", span["attributes"].get("db.query.text", "")))
        for span in spans
    )


# -- the send paths ----------------------------------------------------------------------


@pytest.mark.parametrize("path", ["delay", "on-commit", "many"])
def test_one_trace_from_the_request_to_the_tasks_sql(traced: Stack, path: str) -> None:
    traceparent, trace_id, client_span = new_traceparent()
    task_ids = traced.post(f"/trace/{path}?key={path}-{trace_id}", traceparent)["task_ids"]
    assert task_ids
    for task_id in task_ids:
        run = assert_one_trace(traced, task_id, trace_id, client_span)
        assert run["attributes"]["background.policy"] == "no_retry"
        assert run["attributes"]["background.attempt"] == 0
        assert "INSERT INTO test_records" in statements(sql_children(traced, run))
    if path == "on-commit":
        # The endpoint's own statements are spans of the request's trace too.
        assert "INSERT INTO test_records" in statements(api_sql(traced, trace_id))


def api_sql(stack: Stack, trace_id: str) -> list[dict[str, Any]]:
    return [
        span
        for span in stack.spans()
        if span["trace_id"] == trace_id
        and span["service"] == "app-api"
        and span["kind"] == "CLIENT"
    ]


def test_outbox_rows_keep_the_trace_and_the_relay_restores_it(traced: Stack) -> None:
    traceparent, trace_id, client_span = new_traceparent()
    (task_id,) = traced.post(f"/trace/outbox?key=outbox-{trace_id}", traceparent)["task_ids"]
    # The relay is a process of its own, started after the request has ended.
    relay = subprocess.run(
        [sys.executable, "-m", "app.core.background", "relay", "--once"],
        env={**os.environ, **traced.env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert relay.returncode == 0, relay.stderr
    run = assert_one_trace(traced, task_id, trace_id, client_span, via="app-relay")
    assert "INSERT INTO test_records" in statements(sql_children(traced, run))
    assert "INSERT INTO background_outbox" in statements(api_sql(traced, trace_id))


def test_a_retry_is_in_the_trace_and_links_to_the_first_attempt(traced: Stack) -> None:
    traceparent, trace_id, client_span = new_traceparent()
    (task_id,) = traced.post(f"/trace/retry?key=retry-{trace_id}", traceparent)["task_ids"]
    second = finished_run(traced, task_id)
    first = finished_run(traced, task_id, outcome="retry")
    spans = traced.spans()
    assert first["attributes"]["background.attempt"] == 0
    assert second["attributes"]["background.attempt"] == 1
    assert first["attributes"]["background.policy"] == "aggressive"
    assert first["trace_id"] == second["trace_id"] == trace_id
    # The retry was published by the first attempt: a descendant of its span...
    chain = ancestors(spans, second)
    assert chain[0]["kind"] == "PRODUCER"
    assert first in chain
    assert chain[-1]["kind"] == "SERVER"
    assert chain[-1]["parent_span_id"] == client_span
    # ...and linked to it.
    assert {"trace_id": first["trace_id"], "span_id": first["span_id"]} in [
        {"trace_id": link["trace_id"], "span_id": link["span_id"]}
        for link in second["links"]
        if link["attributes"].get("background.link") == "first_attempt"
    ]
    sql_children(traced, first)
    assert "INSERT INTO test_records" in statements(sql_children(traced, second))


def test_a_replayed_dead_letter_is_in_the_replays_trace_and_links_to_the_failed_run(
    traced: Stack,
) -> None:
    traceparent, trace_id, _client = new_traceparent()
    (task_id,) = traced.post(f"/trace/doomed?key=doomed-{trace_id}", traceparent)["task_ids"]
    failed = finished_run(traced, task_id, outcome="failure")
    assert failed["status"] == "ERROR"
    assert failed["trace_id"] == trace_id
    credentials = base64.b64encode(f"operator:{OPERATOR_PASSWORD}".encode()).decode()
    replay_parent, replay_trace, replay_client = new_traceparent()

    def replayed() -> str | None:
        # The dead letter is written just after the run's span ends: retry until it is there.
        try:
            outcome = traced.post(
                f"/background/api/dead-letters/{task_id}/replay",
                replay_parent,
                authorization=f"Basic {credentials}",
            )
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            raise
        return str(outcome["replayed_as"])

    new_id = wait_for(replayed, "the dead letter's replay")
    run = assert_one_trace(traced, new_id, replay_trace, replay_client)
    assert {"trace_id": trace_id, "span_id": failed["span_id"]} in [
        {"trace_id": link["trace_id"], "span_id": link["span_id"]}
        for link in run["links"]
        if link["attributes"].get("background.link") == "replay_of"
    ]
    sql_children(traced, run)


# -- logs ------------------------------------------------------------------------------


def test_every_log_line_of_a_task_carries_its_trace_and_span(traced: Stack) -> None:
    traceparent, trace_id, _client = new_traceparent()
    (task_id,) = traced.post(f"/trace/delay?key=logs-{trace_id}", traceparent)["task_ids"]
    run = finished_run(traced, task_id)

    def task_lines() -> list[dict[str, Any]]:
        lines = [json.loads(line) for line in traced.worker.log().splitlines() if line[:1] == "{"]
        found = [line for line in lines if line.get("task_id") == task_id]
        return found if any(line.get("event") == "Task succeeded" for line in found) else []

    lines = wait_for(task_lines, "the task's log lines")
    assert {line["event"] for line in lines} >= {"Writing the row", "Row written", "Task succeeded"}
    for line in lines:
        assert line.get("trace_id") == trace_id, line
        assert line.get("span_id"), line
    # The lines of the run are the run span's.
    body = [line for line in lines if line["event"] in ("Writing the row", "Row written")]
    assert {line["span_id"] for line in body} == {run["span_id"]}
