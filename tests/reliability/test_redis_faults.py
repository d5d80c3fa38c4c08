"""Faults with Redis as the broker: 1,000 tasks, none lost.

Each test prints ``sent / completed / lost / completed twice`` (``pytest -s``).
"""

from __future__ import annotations

import base64
import json
import time

import pytest

from tests.reliability.short_visibility import VISIBILITY_TIMEOUT
from tests.reliability.support import (
    PrivateRedis,
    TaskRun,
    kill_one_child,
    reliability_worker,
    wait_until,
)
from tests.support.services import Services

pytestmark = [pytest.mark.redis, pytest.mark.postgres]

TASKS = 1000
HOLD = 0.005  # seconds of "work" per task, so that a kill lands mid-task


def unacked_keys(server: PrivateRedis) -> set[str]:
    """The task keys of the messages Redis holds as delivered but not acknowledged."""
    keys = set()
    for raw in server.client().hvals("unacked"):
        message = json.loads(raw)[0]
        _args, kwargs, _ = json.loads(base64.b64decode(message["body"]))
        keys.add(kwargs["key"])
    return keys


def test_pool_child_killed_mid_task(completions_db: Services, private_redis: PrivateRedis) -> None:
    run = TaskRun("redis: pool child SIGKILL", private_redis.url(), completions_db.postgres_dsn,
                  TASKS, HOLD)  # fmt: skip
    with reliability_worker(private_redis.url(), completions_db.postgres_url) as worker:
        run.send()
        killed = []
        for target in (150, 400, 650):
            assert run.wait_completed(target, 60)
            killed.append(kill_one_child(worker))
        assert run.wait_all(90), worker.log()[-3000:]
        assert "WorkerLostError" in worker.log()
    tally = run.tally()
    assert None not in killed
    assert tally.lost == 0
    assert tally.completed == TASKS


def test_whole_worker_killed_and_restarted(
    completions_db: Services, private_redis: PrivateRedis
) -> None:
    run = TaskRun("redis: whole worker SIGKILL + restart", private_redis.url(),
                  completions_db.postgres_dsn, TASKS, HOLD)  # fmt: skip
    first = reliability_worker(
        private_redis.url(), completions_db.postgres_url, short_visibility=True
    )
    with first:
        run.send()
        assert run.wait_completed(300, 60)
        first.kill()
        killed_at = time.monotonic()
    in_flight = unacked_keys(private_redis)
    with reliability_worker(
        private_redis.url(), completions_db.postgres_url, short_visibility=True
    ) as second:
        assert run.wait_all(90), second.log()[-3000:]
        # The messages the dead worker held come back once their visibility timeout passes.
        from tests.reliability.support import completions

        assert wait_until(
            lambda: in_flight <= set(completions(run.dsn, run.prefix)), 60, interval=0.2
        )
        redelivered_after = time.monotonic() - killed_at
    tally = run.tally()
    print(
        f"[reliability] redis: {len(in_flight)} unacknowledged messages redelivered "
        f"{redelivered_after:.1f}s after the kill (visibility timeout {VISIBILITY_TIMEOUT}s)"
    )
    assert in_flight, "the worker held no message when it was killed"
    assert tally.lost == 0
    assert tally.completed == TASKS


def test_broker_restarted_mid_run(completions_db: Services, private_redis: PrivateRedis) -> None:
    run = TaskRun("redis: broker restart", private_redis.url(), completions_db.postgres_dsn,
                  TASKS, HOLD)  # fmt: skip
    with reliability_worker(
        private_redis.url(), completions_db.postgres_url, short_visibility=True
    ) as worker:
        run.send()
        assert run.wait_completed(300, 60)
        private_redis.restart(down_for=2.0)
        assert run.wait_all(120), worker.log()[-3000:]
        assert worker.process is not None
        assert worker.process.poll() is None, "the worker died instead of reconnecting"
    tally = run.tally()
    assert tally.lost == 0
    assert tally.completed == TASKS
