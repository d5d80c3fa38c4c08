"""Security checks on a full run: worker and API, JSON and console logs.

- No log line contains the database or the broker password. The broker is a
  private Redis with ``requirepass``; the database URL carries a password that
  the local PostgreSQL (trust authentication) ignores. The run includes a
  broker outage, so connection errors, which print URLs, are logged too.
- Task arguments are not logged unless ``BACKGROUND_LOG_TASK_ARGUMENTS=true``.
- (The pickle payload that must be refused is in test_poison_messages.py.)
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.reliability.support import (
    PrivateRedis,
    TaskRun,
    free_port,
    reliability_worker,
    wait_until,
)
from tests.support.services import Services, unavailable

pytestmark = [pytest.mark.redis, pytest.mark.postgres]

DB_PASSWORD = f"DbPw{uuid.uuid4().hex[:12]}"
BROKER_PASSWORD = f"BrokerPw{uuid.uuid4().hex[:12]}"


@pytest.fixture
def guarded_redis() -> Iterator[PrivateRedis]:
    try:
        server = PrivateRedis(password=BROKER_PASSWORD).start()
    except (FileNotFoundError, RuntimeError) as exc:
        unavailable(f"cannot start a private redis-server ({exc})")
    try:
        yield server
    finally:
        server.close()


def database_url_with_password(stack: Services) -> str:
    return stack.postgres_url.replace("postgres@", f"postgres:{DB_PASSWORD}@", 1)


class Api:
    """``uvicorn app.main:app`` in a child process, its output in a file."""

    PORT_ATTEMPTS = 3

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.log_file = tempfile.NamedTemporaryFile(prefix="api-", suffix=".log", delete=False)  # noqa: SIM115
        self.attempts = 0
        self._spawn()

    def _spawn(self) -> None:
        # A port found free may be taken before uvicorn binds it: wait_ready
        # starts again on another one (the pattern of tests/support/redis_server.py).
        self.attempts += 1
        self.port = free_port()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "app.main:app", "--port", str(self.port)],
            env=self.env,
            stdout=self.log_file,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout: float) -> bool:
        """Until the API answers; on a new port if uvicorn could not bind its own."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ready():
                return True
            if self.process.poll() is not None:
                if "address already in use" not in self.log().lower():
                    return False
                if self.attempts >= self.PORT_ATTEMPTS:
                    return False
                self._spawn()
            time.sleep(0.1)
        return False

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def ready(self) -> bool:
        try:
            return httpx.get(f"{self.base}/health", timeout=2).status_code < 600
        except httpx.HTTPError:
            return False

    def log(self) -> str:
        return Path(self.log_file.name).read_text(errors="replace")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
        self.log_file.close()
        Path(self.log_file.name).unlink(missing_ok=True)


def succeeded_line(log: str, task_id: str) -> bool:
    """The framework's own success line for ``task_id`` is in ``log``."""
    return any(task_id in line and "Task succeeded" in line for line in log.splitlines())


@pytest.mark.parametrize("log_format", ["json", "console"])
# Its own waits: start 60 + API 30 + 10 + 60 + 30 + 30 + 15 + stops 50 = 285 s.
@pytest.mark.timeout(360)
def test_no_password_and_no_arguments_in_any_log_line(
    completions_db: Services, guarded_redis: PrivateRedis, log_format: str
) -> None:
    import os

    secret_argument = f"ArgSecret{uuid.uuid4().hex[:12]}"
    db_url = database_url_with_password(completions_db)
    env = {
        "CELERY_BROKER_URL": guarded_redis.url(),
        "CELERY_RESULT_BACKEND": guarded_redis.url(),
        "DATABASE_URL": db_url,
        "LOG_FORMAT": log_format,
        "BACKGROUND_LOG_TASK_ARGUMENTS": "false",
    }
    api = Api({**os.environ, **env})
    try:
        with reliability_worker(
            guarded_redis.url(), db_url, extra_env={"LOG_FORMAT": log_format}
        ) as worker:
            assert api.wait_ready(30), api.log()
            response = httpx.post(
                f"{api.base}/notifications",
                json={"user_id": str(uuid.uuid4()), "message": secret_argument},
                timeout=10,
            )
            assert response.status_code == 202, response.text
            task_id = response.json()["task_id"]
            run = TaskRun(f"security {log_format}", guarded_redis.url(),
                          completions_db.postgres_dsn, 3, 0)  # fmt: skip
            run.send()
            assert run.wait_all(60), worker.log()[-3000:]
            assert wait_until(lambda: succeeded_line(worker.log(), task_id), 30)
            # A broker outage: the worker and the API log connection errors with URLs.
            guarded_redis.restart(down_for=3.0)
            httpx.post(
                f"{api.base}/notifications",
                json={"user_id": str(uuid.uuid4()), "message": secret_argument},
                timeout=30,
            )
            assert wait_until(lambda: "Cannot connect" in worker.log(), 15), worker.log()[-2000:]
            logs = {"worker": worker.log(), "api": api.log()}
    finally:
        api.stop()
    for source, text in logs.items():
        for line in text.splitlines():
            assert DB_PASSWORD not in line, f"{source} logged the database password: {line}"
            assert BROKER_PASSWORD not in line, f"{source} logged the broker password: {line}"
            assert secret_argument not in line, f"{source} logged a task argument: {line}"
    # The control: the lines that name the password-protected broker are there
    # (the check above would have seen the password in them), masked.
    urls = [line for line in logs["worker"].splitlines()
            if f"127.0.0.1:{guarded_redis.port}" in line and "Cannot connect" in line]  # fmt: skip
    assert urls, logs["worker"][-3000:]
    assert all(":**" in line for line in urls), urls


# Its own waits: start 60 + wait_all 60 + 10 + stop 30 = 160 s.
@pytest.mark.timeout(240)
def test_task_arguments_are_logged_when_opted_in(
    completions_db: Services, guarded_redis: PrivateRedis
) -> None:
    """The counterpart: with the opt-in, the same check would see the argument."""
    from app.core.background import celery_app

    run = TaskRun("security opt-in", guarded_redis.url(), completions_db.postgres_dsn, 1, 0)
    with reliability_worker(
        guarded_redis.url(),
        completions_db.postgres_url,
        extra_env={"BACKGROUND_LOG_TASK_ARGUMENTS": "true"},
    ) as worker:
        # The sender opts in too: it decides whether its messages carry the arguments'
        # repr, which Celery's lines on the worker print.
        celery_app.conf.background_log_task_arguments = True
        try:
            run.send()
        finally:
            celery_app.conf.background_log_task_arguments = False
        assert run.wait_all(60)
        assert wait_until(lambda: run.keys[0] in worker.log(), 10), worker.log()[-3000:]
