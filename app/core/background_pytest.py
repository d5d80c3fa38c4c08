"""pytest fixtures for projects that use the framework (loaded through ``pytest11``).

This module sits next to ``app.core.background``, not inside it: pytest
imports plugins before any ``conftest.py`` runs, and importing the package
reads the settings, which a project's conftest may still have to set.

Installing the package registers this plugin; its fixtures are there in every
test, with no import or conftest line:

- ``background_task_context``: a fresh ``TaskTestContext`` (a ``@db_task``
  gets a mock session).
- ``background_db_session``: a real ``AsyncSession`` on the configured
  database, rolled back when the test ends, with the project's tables
  created in it when they are missing (``background_db_tables``);
  ``background_db_context`` is a ``TaskTestContext`` on it.
- ``background_worker``: a real Celery worker for the configured broker,
  started once per test session and stopped at its end.

Override ``background_database_url``, ``background_db_tables`` or
``background_worker_options`` in a ``conftest.py`` to change what they
use. Nothing is imported or started here
until a test asks for one of these fixtures: the application reads its
settings on first import, which must come after the project's conftest has
set its environment.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession

    from app.core.background.internals.operations.worker_process import WorkerProcess
    from app.core.background.internals.testing import TaskTestContext


@pytest.fixture
def background_task_context() -> TaskTestContext:
    """A ``TaskTestContext`` with every default: call a task with it, then assert."""
    from app.core.background.internals.testing import TaskTestContext

    return TaskTestContext()


@pytest.fixture(scope="session")
def background_database_url() -> str | None:
    """The database of ``background_db_session``; None: the configured one (DATABASE_URL)."""
    return None


@pytest.fixture(scope="session")
def background_db_tables() -> Any:
    """The tables ``background_db_session`` creates when missing (a ``MetaData`` or a list).

    Default: every table of the project's model registry ``app/models.py``
    (the application's and the framework's), or none if there is no registry.
    They are created inside the test's transaction, so they are gone after it.
    """
    import importlib

    try:
        importlib.import_module("app.models")
    except ModuleNotFoundError:
        return None
    from app.core.database import Base

    return Base.metadata


try:
    import pytest_asyncio
except ImportError:  # pragma: no cover - the fixture then explains what is missing

    @pytest.fixture(name="background_db_session")
    def _needs_pytest_asyncio(background_database_url: str | None) -> Any:
        """Stands in for the fixture when pytest-asyncio is missing, to say so."""
        pytest.fail("background_db_session needs pytest-asyncio: pip install pytest-asyncio")

else:

    @pytest_asyncio.fixture
    async def background_db_session(
        background_database_url: str | None, background_db_tables: Any
    ) -> AsyncIterator[AsyncSession]:
        """A real ``AsyncSession``: the task's commits are seen by the test, then rolled back."""
        import app.core.background  # noqa: F401 - configures the database from the settings
        from app.core.background.internals.testing_db import task_db_session

        async with task_db_session(
            background_database_url, create_tables=background_db_tables
        ) as session:
            yield session


@pytest.fixture
def background_db_context(background_db_session: AsyncSession) -> TaskTestContext:
    """A ``TaskTestContext`` on ``background_db_session``."""
    from app.core.background.internals.testing import TaskTestContext

    return TaskTestContext(session=background_db_session)


@pytest.fixture(scope="session")
def background_worker_options() -> dict[str, Any]:
    """Keyword arguments of the worker (``include``, ``queues``, ``pool``, ``concurrency``,
    ``env``...); the default is a prefork worker of 2 processes on every queue, with the
    project's discovered task modules."""
    return {}


@pytest.fixture(scope="session")
def background_worker(background_worker_options: dict[str, Any]) -> Iterator[WorkerProcess]:
    """A real ``celery worker`` on the configured broker, for the whole test session.

    It inherits the environment of the test run (so its settings), and is
    stopped (warm shutdown, then kill) when the session ends. ``.log()`` is
    what it printed.
    """
    from app.core.background.internals.operations.worker_process import WorkerProcess

    options = dict(background_worker_options)
    env = options.pop("env", {})
    timeout = float(options.pop("start_timeout", 60.0))
    process = WorkerProcess(env, **options)
    process.start(timeout=timeout)
    try:
        yield process
    finally:
        process.stop()
