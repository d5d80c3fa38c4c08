"""Test set-up: real services, isolated per run, configured before the app is imported."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.services import Services, unavailable

_services = Services()

# Every tests/support/tasks*.py module: the tests' own tasks, loaded by test workers.
TEST_TASK_MODULES = sorted(
    f"tests.support.{path.stem}" for path in (Path(__file__).parent / "support").glob("tasks*.py")
)


def _point_the_app_at_this_runs_services() -> None:
    # The app reads its settings when first imported: point it at this run's
    # own Redis server and PostgreSQL database before anything imports it.
    # At this module's import, not in pytest_configure: pytest imports the
    # conftests of the paths on its command line (tests/reliability/conftest.py
    # imports the app) before any pytest_configure runs.
    if "app.core.background" in sys.modules:
        raise RuntimeError(
            "app.core.background was imported before tests/conftest.py configured it"
        )
    _services.acquire()
    redis_url = _services.redis_url if _services.redis_server else "redis://127.0.0.1:1/0"
    os.environ.update(
        ENVIRONMENT="test",
        LOG_FORMAT="json",
        BACKGROUND_RETRY_DELAY_SCALE="0.01",
        CELERY_BROKER_URL=redis_url,
        CELERY_RESULT_BACKEND=redis_url,
        DATABASE_URL=_services.postgres_url if _services.postgres_db else "sqlite+aiosqlite://",
        DATABASE_CREATE_TABLES="false",
    )
    # Tracing off, whatever the shell says: tests/integration/test_tracing.py turns it
    # on for the processes it starts.
    os.environ.pop("OTEL_TRACES_EXPORTER", None)


_point_the_app_at_this_runs_services()


def pytest_unconfigure(config: pytest.Config) -> None:
    _services.release()


@pytest.fixture(scope="session")
def services() -> Services:
    return _services


@pytest.fixture(scope="session")
def redis_service(services: Services) -> Services:
    if services.redis_server is None:
        unavailable(services.redis_error or "Redis is not available")
    return services


@pytest.fixture(scope="session")
def postgres_service(services: Services) -> Services:
    """The run's PostgreSQL database, migrated (``alembic upgrade head``) as in production.

    ``DATABASE_CREATE_TABLES=false``: the worker and the API check its tables
    at start instead of creating them.
    """
    if services.postgres_db is None:
        unavailable(services.postgres_error or "PostgreSQL is not available")
    from tests.support.migrations import upgrade

    upgrade(services.postgres_url)
    return services


@pytest.fixture(scope="session")
def stack(redis_service: Services, postgres_service: Services) -> Services:
    """Redis and PostgreSQL, with the application's and the tests' tables created."""
    from app.core.database import Base
    from tests.support import models  # noqa: F401 - registers the test tables

    async def create() -> None:
        from sqlalchemy.ext.asyncio import create_async_engine

        import app.models  # noqa: F401

        engine = create_async_engine(postgres_service.postgres_url)
        async with engine.begin() as connection:
            await connection.run_sync(Base.metadata.create_all)
        await engine.dispose()

    asyncio.run(create())
    return postgres_service


@pytest.fixture(scope="session")
def worker(stack: Services) -> Iterator[Any]:
    """A prefork worker (concurrency 2) on this run's Redis and PostgreSQL."""
    from app.core.background.internals.operations.worker_process import WorkerProcess

    with WorkerProcess({}, include=TEST_TASK_MODULES) as process:
        yield process


@dataclass
class PrivateBroker:
    """A database of the run's Redis, for workers that must not share the session worker's."""

    url: str
    app: Any  # a Celery app configured like the real one, sending to this database
    env: dict[str, str]


@contextmanager
def claimed_broker(stack: Services, monkeypatch: pytest.MonkeyPatch) -> Iterator[PrivateBroker]:
    """A Redis database of the run's own server, claimed until the block ends."""
    from celery import Celery

    from app.core.background import celery_app as session_app
    from app.core.background.celery_app import build_celery_config
    from app.core.config import Settings

    # Celery reads CELERY_* variables whenever it builds a result backend (one
    # per thread) or a producer pool: build the session app's now, on the
    # session's Redis, so that they never point at this database after it.
    session_app.backend  # noqa: B018
    session_app.pool  # noqa: B018
    db = stack.claim_redis_db()
    url = stack.redis_url_for(db)
    # Celery prefers these variables to any configuration: point them here too.
    monkeypatch.setenv("CELERY_BROKER_URL", url)
    monkeypatch.setenv("CELERY_RESULT_BACKEND", url)
    settings = Settings(celery_broker_url=url, celery_result_backend=url)
    app = Celery("private", set_as_current=False)
    app.conf.update(build_celery_config(settings))
    try:
        yield PrivateBroker(url, app, {"CELERY_BROKER_URL": url, "CELERY_RESULT_BACKEND": url})
    finally:
        app.close()
        stack.release_redis_db(db)


@pytest.fixture
def private_broker(stack: Services, monkeypatch: pytest.MonkeyPatch) -> Iterator[PrivateBroker]:
    with claimed_broker(stack, monkeypatch) as broker:
        yield broker


@pytest.fixture(scope="module")
def module_broker(stack: Services) -> Iterator[PrivateBroker]:
    """``private_broker`` kept for a whole test module (a worker shared by its tests)."""
    with pytest.MonkeyPatch.context() as monkeypatch, claimed_broker(stack, monkeypatch) as broker:
        yield broker


@pytest.fixture
def redis_client(redis_service: Services) -> Any:
    return redis_service.redis()
