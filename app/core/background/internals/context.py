"""TaskContext: the one object a task body talks to.

A facade over small pieces: a logger, validators, the db session, a batch
helper and a stats counter. The worker builds one per run; tests build a
``TaskTestContext`` (see ``testing.py``) and pass it in directly.
"""

from __future__ import annotations

import copy
import logging
import time
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Mapping
from typing import Any, Self

from sqlalchemy.ext.asyncio import AsyncSession

from .batches import MISSING, BulkCrud, Crud, check_batch_args, chunks, load_batch
from .exceptions import (
    TaskConfigurationError,
    TaskNotFoundError,
    TaskValidationError,
)
from .logging import SUCCESS, TaskLogger
from .monitoring import StatsCounter

# Keys that ``success_result`` owns. A caller's value for one of them is kept
# under ``result_<key>`` instead of replacing the envelope's value.
RESERVED_RESULT_KEYS = ("status", "task_id")

ProgressPublisher = Callable[[Mapping[str, Any]], None]

# Progress is published at most this often (seconds), except the final update.
PROGRESS_INTERVAL = 0.5


class TaskContext:
    """Everything a task run needs: identity, logging, validation, session, batches."""

    def __init__(
        self,
        task_id: str,
        task_name: str,
        attempt: int = 0,
        queue: str = "default",
        session: AsyncSession | None = None,
        logger: TaskLogger | None = None,
        publish_progress: ProgressPublisher | None = None,
        run_once: tuple[str, float] | None = None,
    ) -> None:
        self.task_id = task_id
        self.task_name = task_name
        self.attempt = attempt
        self.queue = queue
        self._session = session
        self.logger = logger or TaskLogger(
            {"task_id": task_id, "task_name": task_name, "queue": queue, "attempt": attempt}
        )
        self._publish_progress = publish_progress
        self._last_progress: float | None = None
        # Seconds between two published progress updates (a test may raise it).
        self.progress_interval = PROGRESS_INTERVAL
        self._batch_stats: StatsCounter | None = None
        # (lease token, lease lifetime) of a run dispatched with a custom
        # task_id: lets a db task skip a redelivery of work it committed.
        self._run_once = run_once
        # True while ``commit_batch`` commits: that commit does not complete the run.
        self._committing_batch = False

    # -- database ---------------------------------------------------------

    @property
    def session(self) -> AsyncSession:
        """The run's ``AsyncSession`` (db tasks only)."""
        if self._session is None:
            raise TaskConfigurationError(
                "ctx.session is only available in @db_task tasks", task_name=self.task_name
            )
        return self._session

    @property
    def has_session(self) -> bool:
        return self._session is not None

    def evolve(self, *, session: AsyncSession) -> Self:
        """A copy of this context with ``session`` (the worker's db task run opens its own).

        The copy shares the logger (and a test context's records) with this one.
        """
        changed = copy.copy(self)
        changed._session = session
        return changed

    @property
    def run_once(self) -> tuple[str, float] | None:
        """(lease token, lease lifetime) when the run's message carries a deduplication lease."""
        return self._run_once

    @property
    def committing_batch(self) -> bool:
        """True while ``commit_batch`` commits: that commit does not complete the run."""
        return self._committing_batch

    def run_directly(self, task: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
        """Run ``task``'s body with this context, outside a worker (``task(ctx, ...)``).

        ``TaskTestContext`` overrides it to fill its defaults from the task.
        """
        return task.run_directly(self, args, kwargs)

    # -- logging ----------------------------------------------------------

    def log_debug(self, message: str, **fields: Any) -> None:
        self.logger.log(logging.DEBUG, message, **fields)

    def log_info(self, message: str, **fields: Any) -> None:
        self.logger.log(logging.INFO, message, **fields)

    def log_success(self, message: str, **fields: Any) -> None:
        self.logger.log(SUCCESS, message, **fields)

    def log_warning(self, message: str, **fields: Any) -> None:
        self.logger.log(logging.WARNING, message, **fields)

    def log_error(self, message: str, exc_info: bool = False, **fields: Any) -> None:
        self.logger.log(logging.ERROR, message, exc_info=exc_info, **fields)

    # -- validation and errors --------------------------------------------

    def validate_uuid(self, value: Any, field_name: str) -> uuid.UUID:
        """``value`` as a UUID, or ``TaskValidationError`` naming the field."""
        if isinstance(value, uuid.UUID):
            return value
        try:
            return uuid.UUID(str(value))
        except (TypeError, ValueError, AttributeError):
            # Never the value itself: the message is logged and stored in the
            # result backend, and an argument may be personal data or a secret
            # (BACKGROUND_LOG_TASK_ARGUMENTS). Its type helps and says nothing.
            raise TaskValidationError(
                f"{field_name} is not a valid UUID",
                field=field_name,
                value_type=type(value).__name__,
            ) from None

    def not_found_error(self, message: str, **fields: Any) -> TaskNotFoundError:
        return TaskNotFoundError(message, **fields)

    def validation_error(self, message: str, **fields: Any) -> TaskValidationError:
        return TaskValidationError(message, **fields)

    def config_error(self, message: str, **fields: Any) -> TaskConfigurationError:
        return TaskConfigurationError(message, **fields)

    # -- results ----------------------------------------------------------

    def success_result(self, **fields: Any) -> dict[str, Any]:
        """``{"status": "success", "task_id": ..., **fields}``.

        ``status`` and ``task_id`` belong to the envelope; a field with one of
        those names is kept as ``result_status`` / ``result_task_id``.
        """
        result: dict[str, Any] = {"status": "success", "task_id": self.task_id}
        for key, value in fields.items():
            result[f"result_{key}" if key in RESERVED_RESULT_KEYS else key] = value
        return result

    # -- batches ----------------------------------------------------------

    def create_stats_counter(self) -> StatsCounter:
        """A new counter, which also becomes ``ctx.batch_stats``.

        ``iter_batches`` counts ids with no entity in it under ``missing``, so
        ``success_result(**stats.to_dict())`` reports them with no extra code.
        """
        self._batch_stats = StatsCounter()
        return self._batch_stats

    @property
    def batch_stats(self) -> StatsCounter:
        """The counter ``iter_batches`` reports ``missing`` to (the last one created)."""
        if self._batch_stats is None:
            self._batch_stats = StatsCounter()
        return self._batch_stats

    def iter_batches(
        self,
        items: Iterable[Any] | AsyncIterable[Any],
        crud: Crud | None = None,
        batch_size: int = 20,
    ) -> AsyncIterator[list[Any]]:
        """Lists of up to ``batch_size`` entities loaded through ``crud``.

        ``items`` is any iterable or async iterable of ids, read lazily. With a
        CRUD object that has ``get_many(session, ids)``, each batch is one
        query; with only ``get(session, id)``, one query per id. Ids with no
        entity are skipped and counted under ``missing`` in ``ctx.batch_stats``
        (the counter from ``create_stats_counter``). ``crud=None`` yields the
        id batches themselves. Bad arguments raise ``TaskValidationError`` here,
        at the call, not at the first batch.
        """
        check_batch_args(items, crud, batch_size)
        if crud is None:
            return chunks(items, batch_size)
        return self._load_batches(items, crud, batch_size)

    async def _load_batches(
        self, items: Iterable[Any] | AsyncIterable[Any], crud: Crud, batch_size: int
    ) -> AsyncIterator[list[Any]]:
        session, stats, bulk = self.session, self.batch_stats, isinstance(crud, BulkCrud)
        stats.increment(MISSING, 0)  # present in the result even when nothing is missing
        async for ids in chunks(items, batch_size):
            yield await load_batch(session, crud, ids, stats, bulk)

    async def commit_batch(self) -> None:
        """Commit the current batch and release its objects from the session.

        After the commit the session forgets every object it loaded
        (``expunge_all``), so its identity map, and the worker's memory, stay
        flat however many rows the task goes through. Objects the task still
        holds stay readable (sessions do not expire on commit) but are
        detached: changing them no longer writes to the database.
        """
        session = self.session
        self._committing_batch = True
        try:
            await session.commit()
        finally:
            self._committing_batch = False
        session.expunge_all()

    def log_progress(self, **metrics: Any) -> None:
        """Log progress and publish it as the task's ``PROGRESS`` state.

        Pass ``done`` and ``total`` to get ``percent``. A tight loop may call
        this as often as it likes: the first update, then at most one per
        ``progress_interval`` seconds, and the final one (``done >= total``)
        are logged at INFO and published; the others are logged at DEBUG only.
        Publishing is best effort: a result backend error is logged, it does
        not fail the task.
        """
        done, total = metrics.get("done"), metrics.get("total")
        final = False
        if isinstance(done, int | float) and isinstance(total, int | float):
            final = done >= total
            if total > 0:
                metrics["percent"] = round(min(100.0, 100.0 * done / total), 1)
        now = time.monotonic()
        last = self._last_progress
        if not (final or last is None or now - last >= self.progress_interval):
            self.log_debug("Progress", **metrics)
            return
        self._last_progress = now
        self.log_info("Progress", **metrics)
        if self._publish_progress is None:
            return
        try:
            self._publish_progress(metrics)
        except Exception as exc:  # noqa: BLE001 - progress must not fail the work it reports
            self.log_warning("Progress not published", error=f"{type(exc).__name__}: {exc}")
