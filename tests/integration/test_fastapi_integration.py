"""The FastAPI app against real PostgreSQL, Redis and a worker: dispatch after commit, status."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi import FastAPI, HTTPException
from fastapi.testclient import TestClient

from app.api.deps import TaskSessionDep
from app.core.background import TaskArgumentError
from app.core.background.fastapi import pending_dispatches
from app.main import create_app
from tests.support import tasks, tasks_fastapi
from tests.support.models import Record
from tests.support.publishes import recorded_publishes
from tests.support.services import Services

pytestmark = pytest.mark.usefixtures("worker")

WAIT = 60.0


def key() -> str:
    return uuid.uuid4().hex


def add_test_routes(app: FastAPI) -> None:
    @app.post("/test/records/{key}")
    async def add_record(key: str, session: TaskSessionDep, outcome: str = "commit") -> Any:
        session.add(Record(key=key))
        first = tasks_fastapi.note_row.delay_on_commit(session, key=key)
        second = tasks_fastapi.note_row.delay_on_commit(session, key=f"{key}-2")
        assert [d.task_id for d in pending_dispatches(session)] == [first.id, second.id]
        if outcome == "rollback":
            await session.rollback()
        elif outcome == "error":
            raise HTTPException(status_code=409, detail="refused")
        else:
            await session.commit()
        return {"task_ids": [first.id, second.id]}

    @app.post("/test/bad-arguments")
    async def bad_arguments(session: TaskSessionDep) -> Any:
        session.add(Record(key=key()))
        try:
            tasks_fastapi.note_row.delay_on_commit(session, key="k", wrong=1)  # type: ignore[call-arg]
        except TaskArgumentError as exc:
            return {"error": str(exc), "pending": len(pending_dispatches(session))}
        return {"error": None}


@pytest.fixture(scope="module")
def client(stack: Services) -> Iterator[TestClient]:
    app = create_app()
    add_test_routes(app)
    with TestClient(app) as test_client:
        yield test_client


def wait_state(client: TestClient, task_id: str, *states: str) -> dict[str, Any]:
    deadline = time.monotonic() + WAIT
    body: dict[str, Any] = {}
    while time.monotonic() < deadline:
        response = client.get(f"/tasks/{task_id}")
        if response.status_code == 200:
            body = response.json()
            if body["state"] in states:
                return body
        time.sleep(0.05)
    raise AssertionError(f"{task_id} never reached {states}: last {body}")


def executions(stack: Services, name: str) -> int:
    return int(stack.redis().get(f"executions:{name}") or 0)


# -- dispatch after commit ---------------------------------------------------


def test_committed_dispatches_run_and_find_their_row(client: TestClient, stack: Services) -> None:
    k = key()
    first, second = client.post(f"/test/records/{k}").json()["task_ids"]
    body = wait_state(client, first, "success")
    assert body["result"]["row_found"] is True
    assert wait_state(client, second, "success")["result"]["key"] == f"{k}-2"
    assert executions(stack, k) == 1


@pytest.mark.parametrize("outcome", ["rollback", "error"])
def test_rolled_back_dispatches_never_run(
    client: TestClient, stack: Services, outcome: str
) -> None:
    k = key()
    response = client.post(f"/test/records/{k}", params={"outcome": outcome})
    discarded = response.json()["task_ids"] if response.status_code == 200 else []
    # A later committed dispatch runs on the same queue: the discarded ones never were sent.
    later = client.post(f"/test/records/{key()}").json()["task_ids"][0]
    wait_state(client, later, "success")
    assert executions(stack, k) == 0
    assert executions(stack, f"{k}-2") == 0
    for task_id in discarded:
        assert client.get(f"/tasks/{task_id}").status_code == 404


def test_create_entity_processes_it_after_commit(client: TestClient) -> None:
    created = client.post("/entities", json={"name": "after commit"})
    assert created.status_code == 201
    body = created.json()
    assert wait_state(client, body["task_id"], "success")["result"]["entity_id"] == body["id"]
    entity = client.get(f"/entities/{body['id']}").json()
    assert (entity["status"], entity["processed_count"]) == ("processed", 1)


def test_wrong_arguments_fail_at_registration_naming_the_task(client: TestClient) -> None:
    body = client.post("/test/bad-arguments").json()
    assert body["error"].startswith("fastapi.note_row: ")
    assert "wrong" in body["error"]
    assert body["pending"] == 0


def test_wrong_arguments_fail_before_sending(stack: Services) -> None:
    with recorded_publishes() as published:
        with pytest.raises(TaskArgumentError, match=r"fastapi\.note_row: .*wrong"):
            tasks_fastapi.note_row.delay(key="k", wrong=1)  # type: ignore[call-arg]
        with pytest.raises(TaskArgumentError, match=r"fastapi\.note_row: "):
            tasks_fastapi.note_row.apply_async(kwargs={"wrong": 1})
        with pytest.raises(TaskArgumentError, match=r"fastapi\.note_row: .*JSON"):
            tasks_fastapi.note_row.options(countdown=1).delay(key=object())  # type: ignore[arg-type]
        assert published == []
        tasks_fastapi.note_row.delay(key=key())  # the control: a valid call is seen
    assert published == ["fastapi.note_row"]


# -- task status API ----------------------------------------------------------


def test_unknown_id_is_404(client: TestClient) -> None:
    assert client.get(f"/tasks/{uuid.uuid4()}").status_code == 404
    assert client.delete(f"/tasks/{uuid.uuid4()}").status_code == 404


def test_scheduled_task_is_pending_then_revoked(
    client: TestClient, stack: Services, worker: Any
) -> None:
    k = key()
    task_id = tasks_fastapi.note_row.options(countdown=2).delay(key=k).id
    assert client.get(f"/tasks/{task_id}").json()["state"] == "pending"
    revoked = client.delete(f"/tasks/{task_id}").json()
    assert revoked == {"task_id": task_id, "state": "revoked", "terminated": False}
    body = client.get(f"/tasks/{task_id}").json()
    assert (body["state"], body["error_type"]) == ("revoked", "TaskRevokedError")
    # The worker holds the message until its ETA, then drops it: only then does
    # "never ran" mean something.
    deadline = time.monotonic() + 30
    while f"Discarding revoked task: fastapi.note_row[{task_id}]" not in worker.log():
        assert time.monotonic() < deadline, worker.log()[-3000:]
        time.sleep(0.1)
    assert executions(stack, k) == 0


def test_a_running_task_is_terminated_by_delete_with_terminate(
    client: TestClient, stack: Services, worker: Any
) -> None:
    k = key()
    task_id = tasks_fastapi.hold.delay(key=k).id
    pid = wait_state(client, task_id, "started")["worker"]["pid"]
    body = client.delete(f"/tasks/{task_id}?terminate=true").json()
    assert body == {"task_id": task_id, "state": "revoked", "terminated": True}
    # The pool process that ran it is gone (SIGTERM), not merely told.
    deadline = time.monotonic() + 30
    while os.path.exists(f"/proc/{pid}"):
        assert time.monotonic() < deadline, worker.log()[-3000:]
        time.sleep(0.05)
    assert f"Terminating {task_id}" in worker.log()
    # Released now, a live run would succeed; the worker goes on with other work.
    stack.redis().set(f"release:{k}", 1)
    tasks_fastapi.note_row.delay(key=key()).get(timeout=WAIT)
    assert client.get(f"/tasks/{task_id}").json()["state"] == "revoked"


@pytest.mark.parametrize("progress", [False, True])
def test_started_or_progress_then_success(
    client: TestClient, stack: Services, progress: bool
) -> None:
    k = key()
    task_id = tasks_fastapi.hold.delay(key=k, progress=progress).id
    if progress:
        body = wait_state(client, task_id, "progress")
        assert body["progress"] == {"done": 1, "total": 4, "percent": 25.0}
    else:
        body = wait_state(client, task_id, "started")
        assert set(body["worker"]) == {"hostname", "pid"}
    assert body["attempt"] == 0
    stack.redis().set(f"release:{k}", 1)
    body = wait_state(client, task_id, "success")
    assert body["result"] == {"status": "success", "task_id": task_id, "key": k}
    assert body["attempt"] == 0


def test_retry_state_reports_error_and_attempt(client: TestClient) -> None:
    task_id = tasks_fastapi.retry_later.delay(key=key()).id
    body = wait_state(client, task_id, "retry")
    assert (body["error_type"], body["attempt"]) == ("SlowDown", 0)
    assert "try again later" in body["error_message"]
    # Clean up: the retry is scheduled 60 s ahead on the worker.
    assert client.delete(f"/tasks/{task_id}").json()["state"] == "revoked"


def test_failure_reports_the_raw_error_type(client: TestClient) -> None:
    task_id = tasks.duplicate_key.delay(key=key()).id
    body = wait_state(client, task_id, "failure")
    assert (body["error_module"], body["error_type"]) == ("sqlalchemy.exc", "IntegrityError")
    assert "duplicate key" in body["error_message"]
    assert body["attempt"] == 0


def test_health_reports_database_broker_and_worker(client: TestClient) -> None:
    assert client.get("/health").json() == {
        "status": "ok",
        "database": "ok",
        "broker": "ok",
        "worker": "ok",
    }


def test_ready_reports_database_and_broker_without_asking_a_worker(client: TestClient) -> None:
    """A load balancer's check: no worker in it, so no worker up cannot take the API out."""
    response = client.get("/ready")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "database": "ok", "broker": "ok"}


def test_ready_fails_with_the_database(stack: Services) -> None:
    from app.core.config import Settings

    host = stack.postgres_url.split("@", 1)[1]
    settings = Settings(database_url=f"postgresql+asyncpg://nosuchrole:db-secret-pw@{host}")
    with TestClient(create_app(settings)) as bad_client:
        response = bad_client.get("/ready")
    assert response.status_code == 503
    assert response.json() == {
        "status": "degraded",
        "database": "error: DBAPIError",
        "broker": "ok",
    }


def test_health_logs_why_the_database_check_failed(
    stack: Services, caplog: pytest.LogCaptureFixture
) -> None:
    from app.core.config import Settings

    host = stack.postgres_url.split("@", 1)[1]
    settings = Settings(database_url=f"postgresql+asyncpg://nosuchrole:db-secret-pw@{host}")
    with TestClient(create_app(settings)) as bad_client:
        response = bad_client.get("/health")
    assert response.status_code == 503
    assert response.json()["database"] == "error: DBAPIError"
    failures = [r for r in caplog.records if r.getMessage() == "Health check failed"]
    database = [r for r in failures if getattr(r, "fields", {}).get("check") == "database"]
    assert len(database) == 1
    assert 'role "nosuchrole" does not exist' in database[0].fields["error"]
