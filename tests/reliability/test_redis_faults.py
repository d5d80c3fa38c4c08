"""Faults with Redis as the broker: 1,000 tasks, none lost.

Each test prints ``sent / completed / lost / completed twice`` (``pytest -s``).
"""

from __future__ import annotations

import base64
import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from app.core.background.internals.transport import redis_broker
from tests.reliability.short_visibility import VISIBILITY_TIMEOUT
from tests.reliability.support import (
    PrivateRedis,
    Tally,
    TaskRun,
    kill_the_child_running,
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


# Its own waits: worker start 60 + 3 kills x 60 + wait_all 90 + stop 30 = 360 s.
@pytest.mark.timeout(420)
def test_pool_child_killed_mid_task(
    completions_db: Services, private_redis: PrivateRedis, tmp_path: Path
) -> None:
    run = TaskRun("redis: pool child SIGKILL", private_redis.url(), completions_db.postgres_dsn,
                  TASKS, HOLD)  # fmt: skip
    # Three tasks announce their pool process and hold it: each kill lands mid-task.
    markers = run.mark((150, 400, 650), tmp_path)
    with reliability_worker(private_redis.url(), completions_db.postgres_url) as worker:
        run.send()
        killed = [kill_the_child_running(pid_file) for pid_file in markers]
        assert run.wait_all(90), worker.log()[-3000:]
        assert worker.log().count("WorkerLostError") >= len(markers)
    tally = run.tally()
    assert None not in killed
    assert tally.lost == 0
    assert tally.completed == TASKS


# Its own waits: start 60 + 60 + kill 10 + start 60 + wait_all 90 + redelivery 60
# + stops 60 = 400 s.
@pytest.mark.timeout(480)
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


# Its own waits: start 60 + 15 + 15 + start 60 + wait_all 60 + stops 30 = 240 s.
@pytest.mark.timeout(300)
def test_worker_killed_before_it_reads_the_answer_to_its_wait(
    completions_db: Services, private_redis: PrivateRedis
) -> None:
    """An idle worker waits on Redis; a task is published, Redis answers the wait,
    and the worker dies before reading the answer. kombu waits with BRPOP on the
    queue itself, which takes the message off it as Redis answers: the message
    is then nowhere (not queued, not recorded as unacknowledged) and the task
    is lost. Frozen (SIGSTOP) the worker reads nothing; it is SIGKILLed once
    Redis has answered, and a new worker must still run the task."""
    run = TaskRun("redis: worker killed before reading its wait's answer",
                  private_redis.url(), completions_db.postgres_dsn, 1, 0.0)  # fmt: skip
    first = reliability_worker(
        private_redis.url(), completions_db.postgres_url, short_visibility=True
    )
    with first:
        assert wait_until(lambda: private_redis.blocked_clients() == 1, 15), "it never waited"
        os.kill(first.pid, signal.SIGSTOP)
        run.send(transport=redis_broker.Transport)  # as the application publishes
        assert wait_until(lambda: private_redis.blocked_clients() == 0, 15), "never answered"
        first.kill()
    with reliability_worker(
        private_redis.url(), completions_db.postgres_url, short_visibility=True
    ) as second:
        assert run.wait_all(60), second.log()[-3000:]
    tally = run.tally()
    print(tally.line())
    assert tally.lost == 0
    assert tally.completed == 1


# Its own waits: start 60 + 60 + restart 32 + wait_all 120 + stop 30 = 302 s.
@pytest.mark.timeout(360)
def test_broker_restarted_mid_run(completions_db: Services, private_redis: PrivateRedis) -> None:
    run = TaskRun("redis: broker restart", private_redis.url(), completions_db.postgres_dsn,
                  TASKS, HOLD)  # fmt: skip
    with reliability_worker(
        private_redis.url(), completions_db.postgres_url, short_visibility=True
    ) as worker:
        run.send()
        assert run.wait_completed(300, 60)
        # What the worker holds delivered and not yet acknowledged as the broker goes down.
        held = unacked_keys(private_redis)
        private_redis.restart(down_for=2.0)
        assert run.wait_all(120), worker.log()[-3000:]
        assert worker.process is not None
        assert worker.process.poll() is None, "the worker died instead of reconnecting"
    tally = run.tally()
    assert held, "the worker held no message when the broker restarted"
    assert tally.lost == 0
    assert tally.completed == TASKS


# -- twenty restarts under a running worker ------------------------------------------

RESTARTS = 20
PER_ROUND = 25  # tasks sent before each restart
ROUND_HOLD = 0.05  # each task holds its slot this long, so restarts find work in flight
# The twenty rounds share one budget (60 s per round would add up to 20 minutes
# if rounds stalled): with the worker's start (60), the final wait_all (120) and
# its stop (30), a scenario stays under the test's timeout (600), so a stall ends
# in the test's own report, not in pytest-timeout's stack dump.
ROUNDS_BUDGET = 300.0


@dataclass
class RestartScenario:
    """A worker on its own Redis; one of its servers (broker or results) restarted 20 times."""

    name: str
    pool: str
    restart_results: bool = False  # restart the result backend's server instead of the broker's
    report: list[str] = field(default_factory=list)

    def run(self, dsn: str, database_url: str) -> tuple[Tally, int, bool, str]:
        """(tally, restarts that found work queued or in flight, worker alive, log tail)."""
        with PrivateRedis() as broker, PrivateRedis() as results:
            restarted = results if self.restart_results else broker
            run = TaskRun(f"{self.name}: {RESTARTS} restarts", broker.url(), dsn,
                          RESTARTS * PER_ROUND, ROUND_HOLD)  # fmt: skip
            concurrency = 1 if self.pool == "solo" else 2
            worker = reliability_worker(
                broker.url(), database_url, result_backend=results.url(),
                pool=self.pool, concurrency=concurrency,
            )  # fmt: skip
            hits = 0
            with worker:
                rounds_end = time.monotonic() + ROUNDS_BUDGET
                for round_ in range(RESTARTS):
                    left = rounds_end - time.monotonic()
                    if left <= 0:
                        self.report.append(f"rounds stopped at {round_} of {RESTARTS}: budget")
                        break
                    keys = run.keys[round_ * PER_ROUND : (round_ + 1) * PER_ROUND]
                    run.send(keys, ignore_result=False)
                    # Restart while this round's tasks run and wait in the queue.
                    run.wait_completed(round_ * PER_ROUND + 2, min(60, left))
                    if _work_in_flight(broker):
                        hits += 1
                    restarted.restart(down_for=0.5)
                    if worker.process is None or worker.process.poll() is not None:
                        break
                # The default visibility timeout (an hour) is in force: every
                # message the restarts interrupted must come back at reconnect.
                run.wait_all(120)
                alive = worker.process is not None and worker.process.poll() is None
                log = worker.log()
            return run.tally(), hits, alive, "\n".join([*self.report, log[-4000:]])


def _work_in_flight(server: PrivateRedis) -> bool:
    """Messages wait in the queue or are held unacknowledged by the worker."""
    client = server.client()
    return bool(client.llen("default") or client.hlen("unacked"))


@pytest.mark.timeout(600)
def test_worker_outlives_twenty_redis_restarts_on_every_pool(
    completions_db: Services,
) -> None:
    scenarios = [
        RestartScenario("redis broker restarted, prefork", "prefork"),
        RestartScenario("redis broker restarted, solo", "solo"),
        RestartScenario("redis broker restarted, threads", "threads"),
        RestartScenario("redis result backend restarted, prefork", "prefork", True),
    ]
    # All at once: each has its own servers and worker, and most of the time is
    # spent waiting for reconnections.
    with ThreadPoolExecutor(len(scenarios)) as pool:
        futures = {
            scenario.name: pool.submit(
                scenario.run, completions_db.postgres_dsn, completions_db.postgres_url
            )
            for scenario in scenarios
        }
        outcomes = {name: future.result() for name, future in futures.items()}
    for name, (tally, hits, alive, log) in outcomes.items():
        print(f"[reliability] {name}: {hits} of {RESTARTS} restarts hit queued or running work")
        assert alive, f"{name}: the worker exited\n{log}"
        assert hits >= RESTARTS // 2, f"{name}: the restarts missed the work in flight"
        assert tally.lost == 0, f"{name}: {tally.line()}\n{log}"
        assert tally.completed == tally.sent
        assert "Unrecoverable error" not in log
