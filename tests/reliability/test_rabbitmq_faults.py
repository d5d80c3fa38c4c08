"""Faults with RabbitMQ as the broker: 1,000 tasks, none lost.

Each test runs in a private virtual host of the shared RabbitMQ. A private
RabbitMQ node is impractical here, so the broker restart is played by closing
every connection of that virtual host (``rabbitmqctl close_all_connections``):
what the worker sees is what a restart shows it, its connection dropped, and
the durable queue keeps its messages, as a restarted node would.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.reliability.support import (
    RabbitVhost,
    TaskRun,
    kill_the_child_running,
    reliability_worker,
    wait_until,
)
from tests.support.services import Services

pytestmark = [pytest.mark.rabbitmq, pytest.mark.postgres]

TASKS = 1000
HOLD = 0.005


# Its own waits: start 60 + 4 kills x 60 + wait_all 90 + stop 30 = 420 s.
@pytest.mark.timeout(480)
@pytest.mark.parametrize("dispatch", ["plain", "task_id"])
def test_pool_child_killed_mid_task(
    completions_db: Services, rabbit: RabbitVhost, dispatch: str, tmp_path: Path
) -> None:
    """With a task_id per task, a run killed after its commit is not completed twice.

    Four kills, each while a task holds its pool process: two before the task's
    commit (the run is rolled back and delivered again: completed once either
    way) and two after it, before the acknowledgement. Those two are completed
    twice without a task_id (the control: the duplicate happens here) and once
    with one (the redelivery finds the run-once row and is skipped).
    """
    with_ids = dispatch == "task_id"
    scenario = "rabbitmq: pool child SIGKILL" + (", tasks sent with task_id" if with_ids else "")
    run = TaskRun(scenario, rabbit.url, completions_db.postgres_dsn, TASKS, HOLD,
                  with_task_ids=with_ids)  # fmt: skip
    # Tasks announce their pool process and hold it: each kill lands mid-task.
    markers = run.mark((150, 650), tmp_path)
    markers += run.mark((400, 800), tmp_path, after_commit=True)
    markers.sort(key=lambda path: run.keys.index(path.stem))
    # The worker releases the leases where this process takes them.
    leases = {"BACKGROUND_DEDUP_BACKEND": "redis",
              "BACKGROUND_DEDUP_REDIS_URL": completions_db.redis_url}  # fmt: skip
    with reliability_worker(
        rabbit.url, completions_db.postgres_url, result_backend=completions_db.redis_url,
        extra_env=leases,
    ) as worker:  # fmt: skip
        run.send()
        killed = [kill_the_child_running(pid_file) for pid_file in markers]
        assert run.wait_all(90), worker.log()[-3000:]
        assert worker.log().count("WorkerLostError") >= len(markers)
    tally = run.tally()
    assert None not in killed
    assert tally.lost == 0
    assert tally.completed == TASKS
    # Only the runs killed after their commit can be completed twice.
    assert tally.twice == (0 if with_ids else 2)


# Its own waits: start 60 + 60 + kill 10 + start 60 + 30 + wait_all 90 + stops 60 = 370 s.
@pytest.mark.timeout(480)
def test_whole_worker_killed_and_restarted(
    completions_db: Services, rabbit: RabbitVhost, tmp_path: Path
) -> None:
    run = TaskRun("rabbitmq: whole worker SIGKILL + restart", rabbit.url,
                  completions_db.postgres_dsn, TASKS, HOLD)  # fmt: skip
    # The kill lands while a task runs (it announced its pid and holds): in-flight work.
    (running,) = run.mark((350,), tmp_path)
    first = reliability_worker(
        rabbit.url, completions_db.postgres_url, result_backend=completions_db.redis_url
    )
    with first:
        run.send()
        assert wait_until(running.exists, 60), first.log()[-3000:]
        assert run.completed() < TASKS
        first.kill()
        killed_at = time.monotonic()
    done_at_kill = run.completed()
    with reliability_worker(
        rabbit.url, completions_db.postgres_url, result_backend=completions_db.redis_url
    ) as second:
        assert run.wait_completed(done_at_kill + 1, 30)
        resumed_after = time.monotonic() - killed_at
        assert run.wait_all(90), second.log()[-3000:]
    tally = run.tally()
    print(
        f"[reliability] rabbitmq: first completion {resumed_after:.1f}s after the kill "
        "(including the new worker's start-up): RabbitMQ requeues at once"
    )
    assert tally.lost == 0
    assert tally.completed == TASKS


# Its own waits: start 60 + 60 + rabbitmqctl 60 + wait_all 120 + stop 30 = 330 s.
@pytest.mark.timeout(420)
def test_broker_connections_dropped_mid_run(
    completions_db: Services, rabbit: RabbitVhost, tmp_path: Path
) -> None:
    run = TaskRun("rabbitmq: broker connections dropped", rabbit.url,
                  completions_db.postgres_dsn, TASKS, HOLD)  # fmt: skip
    # The connections drop while a task runs (it announced its pid and holds for
    # longer than rabbitmqctl takes to start and close them).
    (running,) = run.mark((350,), tmp_path, hold=15.0)
    with reliability_worker(
        rabbit.url, completions_db.postgres_url, result_backend=completions_db.redis_url
    ) as worker:
        run.send()
        assert wait_until(running.exists, 60), worker.log()[-3000:]
        rabbit.close_connections()
        assert run.wait_all(120), worker.log()[-3000:]
        # The drop hit it: Celery cancels a running late-ack task it can no longer acknowledge.
        assert "cannot be acknowledged after a connection loss" in worker.log()
        assert worker.process is not None
        assert worker.process.poll() is None, "the worker died instead of reconnecting"
    tally = run.tally()
    assert tally.lost == 0
    assert tally.completed == TASKS
