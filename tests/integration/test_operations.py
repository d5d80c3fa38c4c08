"""The operations API of the example app (``/background``) on a real worker, broker and database.

The app is the real one (``create_app``: its lifespan opens the engine on this
run's PostgreSQL, its router is mounted behind HTTP Basic) served in process
by FastAPI's TestClient; the tasks run on the session's prefork worker.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from celery.result import AsyncResult
from fastapi.testclient import TestClient

from app.core.background import celery_app
from app.core.background.internals.operations.running import HEARTBEAT_KEY, running_tasks
from app.core.config import get_settings
from tests.conftest import PrivateBroker
from tests.support import tasks_operations
from tests.support.db import fetchval
from tests.support.services import Services
from tests.support.tasks_operations import blocked_key

pytestmark = pytest.mark.usefixtures("worker")

PASSWORD = "correct horse battery staple"
WAIT = 60.0


@pytest.fixture
def client(monkeypatch: pytest.MonkeyPatch, stack: Services) -> Iterator[TestClient]:
    monkeypatch.setenv("OPERATIONS_PASSWORD", PASSWORD)
    get_settings.cache_clear()
    from app.main import create_app

    try:
        with TestClient(create_app()) as client:
            client.auth = ("operator", PASSWORD)
            yield client
    finally:
        get_settings.cache_clear()


def wait_for(condition: Any, what: str, timeout: float = WAIT) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout}s: {what}")


def test_the_router_is_never_open(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    assert client.get("/background/api/queues", auth=("operator", "wrong")).status_code == 401
    assert client.get("/background/", auth=None).status_code == 401
    monkeypatch.delenv("OPERATIONS_PASSWORD")
    get_settings.cache_clear()
    refused = client.get("/background/api/queues")
    assert refused.status_code == 403
    assert "OPERATIONS_PASSWORD" in refused.json()["detail"]


def test_a_change_another_site_makes_the_browser_send_is_refused(client: TestClient) -> None:
    url = "/background/api/dead-letters/any-id/replay"
    cross_site = client.post(url, headers={"Sec-Fetch-Site": "cross-site"})
    assert cross_site.status_code == 403
    other_origin = client.post(url, headers={"Origin": "http://evil.example"})
    assert other_origin.status_code == 403
    same_site_form = client.post(
        "/background/tasks/no-such-task/cancel", headers={"Sec-Fetch-Site": "same-origin"}
    )
    assert same_site_form.status_code == 200  # followed the 303 back to the page
    assert client.post(url).status_code == 404  # an API client: checked, then not found
    assert client.get("/background/", headers={"Sec-Fetch-Site": "cross-site"}).status_code == 200


def test_queue_depths_count_what_waits(client: TestClient) -> None:
    depths = client.get("/background/api/queues").json()
    assert set(depths) == {"high_priority", "default", "low_priority"}
    assert all(isinstance(depth, int) for depth in depths.values())


def test_queue_depths_of_a_broker_no_worker_reads(private_broker: PrivateBroker) -> None:
    from app.core.background.operations import queue_depths

    app = private_broker.app
    assert queue_depths(app) == {"high_priority": 0, "default": 0, "low_priority": 0}
    # Plain kombu messages: Celery's send would run the framework's publish
    # hooks, which write to the session app's result backend.
    with app.producer_or_acquire() as producer:
        for queue in ("default", "default", "default", "low_priority"):
            producer.publish({"waiting": True}, routing_key=queue, serializer="json")
    assert queue_depths(app) == {"high_priority": 0, "default": 3, "low_priority": 1}


def test_dead_letters_through_the_api_failure_to_replay(
    client: TestClient, stack: Services
) -> None:
    key = uuid.uuid4().hex
    stack.redis().set(blocked_key(key), 1)
    result = tasks_operations.fails_while_blocked.delay(key=key, payload={"to": "a@b.c"})
    with pytest.raises(Exception):  # noqa: B017, PT011
        result.get(timeout=WAIT)
    letter = wait_for(
        lambda: (
            (r := client.get(f"/background/api/dead-letters/{result.id}")).status_code == 200
            and r.json()
        ),
        "the dead letter",
    )
    assert letter["reason"] == "non-retriable"
    assert letter["error_message"] == f"{key} is blocked"
    assert '"to": "a@b.c"' in letter["arguments"]
    listed = client.get(
        "/background/api/dead-letters", params={"task_name": "tests.ops.fails_while_blocked"}
    ).json()
    assert result.id in [item["task_id"] for item in listed["items"]]
    assert "arguments" not in listed["items"][0]  # the list leaves the values out
    groups = client.get("/background/api/dead-letters/groups").json()
    assert {
        "task_name": "tests.ops.fails_while_blocked",
        "error_type": "NonRetriableTaskError",
    } in [{"task_name": g["task_name"], "error_type": g["error_type"]} for g in groups]
    stack.redis().delete(blocked_key(key))
    replayed = client.post(f"/background/api/dead-letters/{result.id}/replay")
    assert replayed.status_code == 200, replayed.text
    new_id = replayed.json()["replayed_as"]
    assert AsyncResult(new_id, app=celery_app).get(timeout=WAIT)["key"] == key
    again = client.post(f"/background/api/dead-letters/{result.id}/replay")
    assert again.status_code == 409
    assert again.json()["detail"]["refused"] == "already replayed"
    assert client.post("/background/api/dead-letters/nope/replay").status_code == 404
    assert client.get("/background/api/dead-letters/nope").status_code == 404
    assert client.delete(f"/background/api/dead-letters/{result.id}").status_code == 204
    assert client.delete(f"/background/api/dead-letters/{result.id}").status_code == 404


@pytest.mark.parametrize(
    "cancel_route",
    ["/background/api/tasks/{}", "/tasks/{}"],  # the operations API; the status API, as is
)
def test_a_running_async_task_is_listed_then_cancelled_rolled_back_and_the_worker_goes_on(
    client: TestClient, stack: Services, cancel_route: str
) -> None:
    key = uuid.uuid4().hex
    running = tasks_operations.write_then_wait.delay(key=key, seconds=60)
    listed = wait_for(
        lambda: [
            task
            for task in client.get("/background/api/running").json()["tasks"]
            if task["task_id"] == running.id
        ],
        "the task listed as running",
    )
    task = listed[0]
    assert (task["task_name"], task["attempt"], task["stuck"]) == (
        "tests.ops.write_then_wait", 0, False,
    )  # fmt: skip
    assert task["worker"] is not None
    wait_for(lambda: stack.redis().get(f"executions:{key}"), "the row written")
    cancelled = client.delete(cancel_route.format(running.id))
    assert (cancelled.json()["task_id"], cancelled.json()["state"]) == (running.id, "revoked")
    wait_for(
        lambda: (
            running.id
            not in [t["task_id"] for t in client.get("/background/api/running").json()["tasks"]]
        ),
        "the run ended",
        timeout=15,
    )
    assert running.state == "REVOKED"
    assert fetchval(stack, "SELECT count(*) FROM test_records WHERE key = $1", key) == 0
    # The same worker process runs the next task: nothing was killed.
    after = tasks_operations.fails_while_blocked.delay(key=uuid.uuid4().hex)
    assert after.get(timeout=WAIT)["status"] == "success"
    assert client.delete(cancel_route.format("no-such-task")).status_code == 404


def test_a_running_sync_task_is_not_cancelled_nor_hidden(client: TestClient) -> None:
    running = tasks_operations.ignores_soft_limit.delay(seconds=3.0)
    wait_for(
        lambda: (
            running.id
            in [t["task_id"] for t in client.get("/background/api/running").json()["tasks"]]
        ),
        "the sync task listed as running",
    )
    refused = client.delete(f"/background/api/tasks/{running.id}")
    assert refused.status_code == 409
    assert "sync body" in refused.json()["detail"]
    listed = [t["task_id"] for t in client.get("/background/api/running").json()["tasks"]]
    assert running.id in listed  # still shown: it still runs
    running.get(timeout=WAIT)
    assert running.state == "SUCCESS"


def test_a_task_past_its_hard_limit_or_on_a_silent_worker_is_stuck(stack: Services) -> None:
    key = uuid.uuid4().hex
    running = tasks_operations.write_then_wait.delay(key=key, seconds=30)
    try:
        mine = wait_for(
            lambda: [t for t in running_tasks(celery_app) or [] if t.task_id == running.id],
            "the task listed as running",
        )[0]
        assert not mine.stuck
        later = running_tasks(celery_app, now=time.time() + 400)  # past the 330 s hard limit
        assert later is not None
        late = next(t for t in later if t.task_id == running.id)
        assert late.stuck
        assert late.stuck_reason is not None
        assert "hard time limit (330s)" in late.stuck_reason
        # Its worker stops beating (as if gone): stuck within the reading, before any limit.
        stack.redis().hdel(HEARTBEAT_KEY, mine.worker)
        silent = next(t for t in running_tasks(celery_app) or [] if t.task_id == running.id)
        assert silent.stuck
        assert silent.stuck_reason is not None
        assert "has not been heard from" in silent.stuck_reason
    finally:
        celery_app.control.revoke(running.id)
        from app.core.background.operations import revoke

        revoke(celery_app, running.id)
        wait_for(lambda: running.state == "REVOKED", "revoked")
