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
import time
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


_SEND_PAIRS = """
import sys
from tests.support.tasks_admission import pair_to_file
for i in range(int(sys.argv[2])):
    pair_to_file.delay(path=sys.argv[1], key="k", seconds=0.3)
"""


@pytest.mark.timeout(300)
def test_a_concurrency_cap_holds_on_the_embedded_default(
    tmp_path: Path, embedded_env: dict[str, str]
) -> None:
    """No Redis: the cap's slots live in the SQLite database, shared by the worker's processes."""
    runs, count = tmp_path / "runs.jsonl", 8
    worker = WorkerProcess(
        {}, cwd=tmp_path, concurrency=4, include=["tests.support.tasks_admission"]
    )
    worker.env = embedded_env
    with worker:
        subprocess.run(
            [sys.executable, "-c", _SEND_PAIRS, str(runs), str(count)],
            cwd=tmp_path, env=embedded_env, check=True, timeout=60,
        )  # fmt: skip
        deadline = time.monotonic() + 120
        while not runs.exists() or len(runs.read_text().splitlines()) < count:
            assert time.monotonic() < deadline, worker.log()[-3000:]
            time.sleep(0.1)
        log = worker.log()
    records = [json.loads(line) for line in runs.read_text().splitlines()]
    assert len({r["task_id"] for r in records}) == count
    events = sorted([(r["start"], 1) for r in records] + [(r["end"], -1) for r in records])
    at_once = most = 0
    for _, step in events:
        at_once += step
        most = max(most, at_once)
    assert most == 2  # four processes, a cap of two: met, never passed
    assert '"Task waiting for its limit"' in log
    with sqlite3.connect(tmp_path / ".data" / "app.db") as connection:
        # Every run gave its slot back: the table the worker's processes shared is empty.
        held = connection.execute("SELECT count(*) FROM background_admission_slots").fetchone()
    assert held == (0,)
