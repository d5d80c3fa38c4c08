"""The benchmark's own services, set up before the application is imported.

- Redis: a redis-server of its own on a free port (database 0 the broker,
  1 the results; no persistence), stopped at the end. The shared server's
  databases 14 and 15 are meant for benchmarks, but other benchmarks flush
  them at any moment, which would empty a queue in the middle of a drain.
- PostgreSQL: a database of its own (``synchronous_commit = off``), created
  here and dropped at the end.
- RabbitMQ: a virtual host of its own (``rabbitmqctl add_vhost``), deleted at
  the end, when the RabbitMQ part runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import asyncpg
import redis

REDIS_HOST = "127.0.0.1"
BROKER_DB, RESULT_DB = 0, 1
ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
RABBITMQ_BASE = "amqp://guest:guest@127.0.0.1:5672"


@dataclass
class BenchServices:
    db_name: str
    redis_port: int = 0
    vhost: str | None = None

    @property
    def broker_url(self) -> str:
        return f"redis://{REDIS_HOST}:{self.redis_port}/{BROKER_DB}"

    @property
    def result_url(self) -> str:
        return f"redis://{REDIS_HOST}:{self.redis_port}/{RESULT_DB}"

    @property
    def database_url(self) -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:5432/{self.db_name}"

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:5432/{self.db_name}"

    @property
    def rabbit_url(self) -> str:
        assert self.vhost is not None
        return f"{RABBITMQ_BASE}/{self.vhost}"

    def redis_url(self, db: int) -> str:
        return f"redis://{REDIS_HOST}:{self.redis_port}/{db}"

    def redis_db(self, db: int) -> redis.Redis:
        return redis.Redis(host=REDIS_HOST, port=self.redis_port, db=db)

    def broker(self) -> redis.Redis:
        return redis.Redis(host=REDIS_HOST, port=self.redis_port, db=BROKER_DB)

    def results(self) -> redis.Redis:
        return redis.Redis(host=REDIS_HOST, port=self.redis_port, db=RESULT_DB)

    def worker_env(self, broker_url: str | None = None) -> dict[str, str]:
        return {
            "CELERY_BROKER_URL": broker_url or self.broker_url,
            "CELERY_RESULT_BACKEND": self.result_url,
            "DATABASE_URL": self.database_url,
            # The bench's fresh database has no migrations: the framework's tables
            # are created at run time (as before migrations existed).
            "DATABASE_CREATE_TABLES": "true",
            "LOG_FORMAT": "console",
        }


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((REDIS_HOST, 0))
        return int(sock.getsockname()[1])


def _start_redis(port: int, folder: str) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", REDIS_HOST, "--save", "",
         "--appendonly", "no", "--dir", folder, "--logfile", f"{folder}/redis.log"],
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    client = redis.Redis(host=REDIS_HOST, port=port)
    for _ in range(100):
        with contextlib.suppress(redis.RedisError):
            if client.ping():
                return process
        time.sleep(0.1)
    process.kill()
    raise SystemExit("the benchmark's redis-server did not start")


async def _admin(statement: str) -> None:
    connection = await asyncpg.connect(ADMIN_DSN)
    try:
        await connection.execute(statement)
    finally:
        await connection.close()


def _rabbitmqctl(*args: str) -> str:
    done = subprocess.run(
        ["rabbitmqctl", "-q", *args], check=True, capture_output=True, text=True, timeout=60
    )
    return done.stdout


@contextlib.contextmanager
def bench_services(rabbitmq: bool) -> Iterator[BenchServices]:
    services = BenchServices(
        db_name=f"bgbench_{os.getpid()}_{uuid.uuid4().hex[:6]}", redis_port=_free_port()
    )
    folder = tempfile.mkdtemp(prefix="bgbench-redis-")
    redis_server = _start_redis(services.redis_port, folder)
    asyncio.run(_admin(f'CREATE DATABASE "{services.db_name}"'))
    # Commits do not wait for the disk flush: every side pays the same, and the
    # figures show the CPU cost of each way of writing, not this VM's fsync latency.
    asyncio.run(_admin(f'ALTER DATABASE "{services.db_name}" SET synchronous_commit = off'))
    if rabbitmq and shutil.which("rabbitmqctl"):
        services.vhost = services.db_name
        _rabbitmqctl("add_vhost", services.vhost)
        _rabbitmqctl("set_permissions", "-p", services.vhost, "guest", ".*", ".*", ".*")
    # The application reads its settings when first imported: after this point.
    os.environ.update(services.worker_env(), LOG_LEVEL="WARNING", BACKGROUND_RETRY_DELAY_SCALE="1")
    try:
        yield services
    finally:
        if services.vhost:
            with contextlib.suppress(subprocess.SubprocessError):
                _rabbitmqctl("delete_vhost", services.vhost)
        with contextlib.suppress(Exception):
            asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{services.db_name}" WITH (FORCE)'))
        redis_server.terminate()
        redis_server.wait(10)
        shutil.rmtree(folder, ignore_errors=True)
