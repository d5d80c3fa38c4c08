"""The embedded default: SQLite and the file broker under ./.data, no server at all.

Worker and producer run as separate processes in a fresh folder, with the
settings' defaults (nothing points at Redis or PostgreSQL).
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from app.core.background.internals.operations.worker_process import WorkerProcess

ROOT = Path(__file__).resolve().parents[2]
SERVICE_VARIABLES = (
    "DATABASE_URL",
    "CELERY_BROKER_URL",
    "CELERY_RESULT_BACKEND",
    "DATABASE_CREATE_TABLES",
)


@pytest.fixture
def embedded_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SERVICE_VARIABLES}
    env.update(ENVIRONMENT="development", PYTHONPATH=str(ROOT), BACKGROUND_RETRY_DELAY_SCALE="0")
    return env


# Its own waits: worker start 60 + client 120 + stop 30 = 210 s.
@pytest.mark.timeout(300)
def test_worker_and_producer_on_the_embedded_default(
    tmp_path: Path, embedded_env: dict[str, str]
) -> None:
    worker = WorkerProcess({}, cwd=tmp_path)
    worker.env = embedded_env
    with worker:
        client = subprocess.run(
            [sys.executable, "-m", "tests.support.embedded.client"],
            cwd=tmp_path,
            env=embedded_env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        log = worker.log()
    assert client.returncode == 0, client.stderr[-3000:] + log[-3000:]
    report = json.loads(client.stdout.strip().splitlines()[-1])
    entity_id = report["entity_id"]
    assert report["processed"]["status"] == "success"
    assert report["processed"]["entity_id"] == entity_id
    assert report["missing_error"].startswith("TaskNotFoundError: Entity not found")
    assert report["notified"]["sent"] is True
    print(f"embedded round trip: {report['round_trip_ms']} ms per task")

    # Everything lives under ./.data of the working folder.
    data = tmp_path / ".data"
    assert (data / "app.db").is_file()
    assert (data / "results.db").is_file()
    assert (data / "broker" / "queue").is_dir()
    with sqlite3.connect(data / "app.db") as connection:
        status, count = connection.execute(
            "SELECT status, processed_count FROM entities WHERE id = ?",
            (entity_id.replace("-", ""),),
        ).fetchone()
    assert (status, count) == ("processed", 1)
    # The non-retriable failure is a dead letter in the same SQLite database,
    # which the CLI reads with the same defaults.
    with sqlite3.connect(data / "app.db") as connection:
        reason, error_type = connection.execute(
            "SELECT reason, error_type FROM background_dead_letters WHERE task_id = ?",
            (report["missing_id"],),
        ).fetchone()
    assert (reason, error_type) == ("non-retriable", "TaskNotFoundError")
    shown = subprocess.run(
        [sys.executable, "-m", "app.core.background", "dead-letters", "show",
         report["missing_id"]],
        cwd=tmp_path, env=embedded_env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    assert "Entity not found" in shown.stdout
    assert "transport:   app.core.background.internals.transport.file_broker:Transport" in log


@pytest.mark.timeout(300)
def test_running_tasks_are_listed_from_the_embedded_result_database(
    tmp_path: Path, embedded_env: dict[str, str]
) -> None:
    worker = WorkerProcess({}, cwd=tmp_path, include=["tests.support.tasks_asyncio_pool"])
    worker.env = embedded_env
    with worker:
        client = subprocess.run(
            [sys.executable, "-m", "tests.support.embedded.running"],
            cwd=tmp_path, env=embedded_env, capture_output=True, text=True, timeout=120,
            check=False,
        )  # fmt: skip
        log = worker.log()
    assert client.returncode == 0, client.stderr[-3000:] + log[-3000:]
    report = json.loads(client.stdout.strip().splitlines()[-1])
    listed = report["listed"]
    assert listed is not None, "the run was never listed as running"
    assert (listed["task_name"], listed["attempt"], listed["stuck"]) == ("pool.sleep", 0, False)
    assert listed["worker"] is not None  # its heartbeat is in the same database
    assert listed["pid"] is not None
    assert report["after"] == []  # struck out when it ended
    with sqlite3.connect(tmp_path / ".data" / "results.db") as connection:
        (beats,) = connection.execute(
            "SELECT count(*) FROM background_worker_heartbeats"
        ).fetchone()
    assert beats == 0  # a worker that stopped warm takes its heartbeat away
