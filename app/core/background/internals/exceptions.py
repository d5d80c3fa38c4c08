"""The framework's exceptions, and the one rule that says which are retried.

Retry behaviour lives in the exception *types*: everything under
``NonRetriableTaskError`` fails at once, as does a database constraint
violation; everything else is retried by the task's policy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from celery.exceptions import Ignore
from kombu.exceptions import OperationalError
from sqlalchemy.exc import DBAPIError, IntegrityError

# Importing it at run time too changes nothing (Celery is loaded): pragma: no mutate
if TYPE_CHECKING:  # pragma: no mutate
    from celery.result import AsyncResult


class TaskError(Exception):
    """A background task failed."""

    def __init__(self, message: str | None = None, **fields: Any) -> None:
        self.message = message or (self.__doc__ or "").strip()
        self.fields = fields
        # Celery stores ``args`` in the result backend: keep the fields readable there.
        details = ", ".join(f"{key}={value!r}" for key, value in fields.items())
        super().__init__(f"{self.message} ({details})" if details else self.message)


class NonRetriableTaskError(TaskError):
    """A background task failed in a way that retrying cannot fix."""


class TaskValidationError(NonRetriableTaskError):
    """The task received invalid input."""


class TaskArgumentsRefusedError(TaskValidationError):
    """The message's arguments do not fit the task's signature: refused before the body ran."""


class TaskNotFoundError(NonRetriableTaskError):
    """A resource the task needs does not exist."""


class TaskConfigurationError(NonRetriableTaskError):
    """The task or its environment is misconfigured."""


class MissingTablesError(TaskConfigurationError):
    """Tables the framework needs are missing: run the migrations (``alembic upgrade head``)."""

    def __init__(self, tables: list[str], database: str) -> None:
        self.tables = tables
        self.database = database
        names = ", ".join(tables)
        noun = "table" if len(tables) == 1 else "tables"
        verb = "is" if len(tables) == 1 else "are"
        super().__init__(
            f"{noun} {names} {verb} missing from {database}: run `alembic upgrade head` "
            "(or set DATABASE_CREATE_TABLES=true to create tables at start)"
        )


class TaskResultError(NonRetriableTaskError):
    """The task returned a value the result backend cannot store (not JSON)."""


class TaskProcessLostError(NonRetriableTaskError):
    """The process running the task died more often than its retry policy allows.

    A whole worker process that dies (SIGKILL, out of memory) acknowledges
    nothing: the broker delivers the message again with the same attempt
    number, so each death is counted apart (``transport/result_backend.py``).
    """


class TaskDeferred(Ignore):
    """This delivery ended because the task must wait for its limits; it is sent again.

    Celery's ``Ignore``: the message is acknowledged and no state is stored
    by Celery (the gate stored ``WAITING``). Not a failure: no retry, no
    dead letter, and a deduplication lease stays with the copy sent again.
    """


class TaskDefinitionError(ValueError):
    """A task was declared wrongly (raised at import time, never at run time)."""


class TaskArgumentError(TypeError):
    """A task was called with arguments that cannot be sent (raised before sending)."""


class TaskDispatchError(OperationalError):
    """A task was not handed to the broker in time (raised by ``delay()`` and friends).

    A kombu ``OperationalError``, so code that catches Celery's "broker down"
    error keeps working. The message names the broker and result backend
    (passwords masked) and what to check. The broker may still have received a
    message whose confirmation was lost: sending again may run the task twice
    unless it has a ``task_id`` (deduplicated).

    From a send of many messages (``delay_many``): ``task_ids`` are the ids of
    the batch that was not confirmed, ``sent`` the results of the messages
    sent before it, in order (``calls[:len(sent)]``); the calls after that
    batch were not sent.
    """

    def __init__(
        self,
        message: str,
        # Every caller passes keywords: '*' or '/' here are the same. pragma: no mutate
        *,  # pragma: no mutate
        task_name: str,
        task_ids: tuple[str, ...],
    ) -> None:
        super().__init__(message)
        self.task_name = task_name
        self.task_ids = task_ids
        self.sent: tuple[AsyncResult[Any], ...] = ()


class TaskDiscoveryError(ImportError):
    """A ``tasks.py`` module failed to import when the worker started."""


# asyncpg errors reach us as a plain DBAPIError, so the type alone cannot tell
# a lost connection (retry) from a constraint violation: the SQLSTATE does.
# Constraint violations (23), and configuration the next attempt will meet too:
# a refused login or unknown role (28), a database that does not exist (3D000).
_NON_RETRIABLE_SQLSTATE_PREFIXES = ("23", "28", "3D000")

NON_RETRIABLE_ERRORS: tuple[type[Exception], ...] = (NonRetriableTaskError, IntegrityError)


def sqlstate_of(exc: BaseException) -> str | None:
    """The SQLSTATE code carried by a database error, if any (asyncpg or psycopg)."""
    orig = getattr(exc, "orig", None)
    for source in (orig, getattr(orig, "__cause__", None), exc):
        if source is None:
            continue
        code = getattr(source, "sqlstate", None) or getattr(source, "pgcode", None)
        if isinstance(code, str) and code:
            return code
    return None


def is_retriable(exc: BaseException) -> bool:
    """Whether the retry policy applies to ``exc``.

    Non-retriable: the ``NonRetriableTaskError`` family, constraint
    violations (``IntegrityError``, SQLSTATE class 23) and database
    configuration errors (a refused login, SQLSTATE class 28; an unknown
    database, 3D000), which fail at once with the database's own message.
    Retriable: everything else, including ``OperationalError``,
    ``TimeoutError`` and unknown errors.
    """
    if isinstance(exc, NON_RETRIABLE_ERRORS):
        return False
    if isinstance(exc, DBAPIError):
        code = sqlstate_of(exc)
        if code is not None and code.startswith(_NON_RETRIABLE_SQLSTATE_PREFIXES):
            return False
    return True
