"""PostgreSQL restarted in the middle of a run of db tasks: retried by policy, none lost.

The database is a private cluster (initdb + pg_ctl on a free port), never the
shared server. Tasks that meet the restart fail with a connection error, are
retried by their ``standard`` policy (delays scaled by 0.05: 1.5-3 s, 3-6 s,
6-12 s, long enough to outlast a restart) and complete.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.reliability.support import (
    PrivatePostgres,
    PrivateRedis,
    TaskRun,
    create_completions_table,
    reliability_worker,
)
from tests.support.migrations import upgrade
from tests.support.services import unavailable

pytestmark = [pytest.mark.redis, pytest.mark.postgres]

TASKS = 1000


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    server = PrivatePostgres()
    if server.available:
        unavailable(server.available)
    try:
        server.start()
        upgrade(server.url)  # the worker checks the migrated tables at start
        create_completions_table(server.dsn)
        yield server
    finally:
        server.close()


# Its own waits: fixtures (initdb 60 + pg_ctl 60 + redis 75), then start 60 + 60
# + restart 121 + wait_all 90 + stop 30 = 556 s.
@pytest.mark.timeout(600)
def test_postgres_restarted_mid_run(
    private_postgres: PrivatePostgres, private_redis: PrivateRedis
) -> None:
    run = TaskRun("postgres restart", private_redis.url(), private_postgres.dsn, TASKS, 0.005)
    with reliability_worker(
        private_redis.url(),
        private_postgres.url,
        extra_env={"BACKGROUND_RETRY_DELAY_SCALE": "0.05"},
    ) as worker:
        run.send()
        assert run.wait_completed(300, 60)
        private_postgres.restart(down_for=1.0)
        assert run.wait_all(90), worker.log()[-3000:]
        retries = worker.log().count("Task failed, will retry")
    tally = run.tally()
    print(f"[reliability] postgres restart: {retries} runs failed and were retried")
    assert retries > 0, "no task met the restart"
    assert tally.lost == 0
    assert tally.completed == TASKS
