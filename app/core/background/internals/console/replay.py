"""Sending dead letters again, through the task's own send path.

A replay calls the task's ``apply_async`` with the arguments the dead letter
keeps, so it goes where any dispatch goes: the task's queue, its
deduplication, the bounded publish, the ``SENT`` record. The new task's id
is written to the dead letter (``replayed_as``) in the same transaction that
claimed it: the claim (an UPDATE of a row not yet replayed) holds the row
while the task is sent, so a second replay of the same dead letter (a double
click, two operators) waits, then finds it replayed and sends nothing. A
send that fails rolls the claim back: the dead letter stays, ready for
another try. Should the process die between the send and the commit, the
task was sent and the row is not marked: at least once, as everywhere else.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

from celery import Celery, Task
from sqlalchemy.ext.asyncio import AsyncConnection

from ..delivery.dedup import deduplicator
from ..logging import FRAMEWORK_LOGGER_NAME
from ..operations.dead_letters import DeadLetterFilter, DeadLetterStore, dead_letters
from ..trace_context import REPLAY_OF_HEADER, TRACEPARENT

_log = logging.getLogger(FRAMEWORK_LOGGER_NAME)

# Why a dead letter was not sent again.
Refusal = Literal["not found", "already replayed", "not replayable", "deduplicated", "send failed"]


@dataclass(frozen=True, slots=True)
class ReplayOutcome:
    """What became of one dead letter's replay."""

    task_id: str
    replayed_as: str | None = None
    refused: Refusal | None = None
    reason: str | None = None

    @property
    def sent(self) -> bool:
        return self.replayed_as is not None and self.refused is None


@dataclass(frozen=True, slots=True)
class ReplaySummary:
    """The replays of a group or a filtered set."""

    outcomes: Sequence[ReplayOutcome] = field(default_factory=tuple)

    @property
    def sent(self) -> int:
        return sum(outcome.sent for outcome in self.outcomes)

    @property
    def refused(self) -> list[ReplayOutcome]:
        return [outcome for outcome in self.outcomes if not outcome.sent]


def registered_task(app: Celery, name: str) -> Task[Any, Any] | None:
    """The task called ``name``, importing the app's task modules if none is registered yet.

    A web process or the CLI imports only the task modules its own code uses;
    the worker imports every configured one (``include``) at start-up. Do the
    same here before concluding that the task is gone.
    """
    if name not in app.tasks:
        app.loader.import_default_modules()
    return app.tasks.get(name)


async def replay(store: DeadLetterStore, app: Celery, task_id: str) -> ReplayOutcome:
    """Send the dead letter of ``task_id`` again; the outcome says what happened."""
    letter = await store.get(task_id)
    if letter is None:
        return ReplayOutcome(task_id, refused="not found", reason=f"no dead letter {task_id!r}")
    if letter.replayed_as is not None:
        return ReplayOutcome(
            task_id,
            refused="already replayed",
            reason=f"already replayed as {letter.replayed_as}",
        )
    task = await asyncio.to_thread(registered_task, app, letter.task_name)
    if task is None:
        return ReplayOutcome(
            task_id,
            refused="not replayable",
            reason=f"no task named {letter.task_name!r} is registered in this application "
            "(renamed or removed since it failed?); the dead letter is kept",
        )
    if not letter.arguments_complete:
        return ReplayOutcome(
            task_id,
            refused="not replayable",
            reason="its arguments were not kept whole (too large, or the message could not "
            "be read); send it again by hand from what `show` prints",
        )
    args, kwargs = letter.call()
    try:
        # The failed task's id may be a deduplication key (``notify-42``): while
        # that id holds a lease (queued, running, retrying, in its period, or
        # revoked), a replay would be the duplicate the key exists to prevent.
        if await asyncio.to_thread(deduplicator.store.holder, task_id) is not None:
            return ReplayOutcome(
                task_id,
                refused="deduplicated",
                reason=f"the id {task_id!r} is held by a deduplication lease (a task with "
                "it is queued, running or waiting to retry, or its period or revocation "
                "holds); replay once it is free",
            )
    except Exception as exc:  # noqa: BLE001 - the reason is the answer; the row is kept
        return ReplayOutcome(task_id, refused="send failed", reason=f"{type(exc).__name__}: {exc}")
    # Tracing: the new run's span links to the run that failed (its traceparent, kept
    # with the dead letter when tracing was on there).
    failed_run = letter.trace().get(TRACEPARENT)
    options = {"headers": {REPLAY_OF_HEADER: failed_run}} if failed_run else {}
    # Shielded: a client that goes away mid-request must not cut between the
    # send and the mark that records it.
    return await asyncio.shield(_claim_send_and_mark(store, task, task_id, args, kwargs, options))


async def _claim_send_and_mark(
    store: DeadLetterStore,
    task: Task[Any, Any],
    task_id: str,
    args: list[Any],
    kwargs: dict[str, Any],
    options: dict[str, Any],
) -> ReplayOutcome:
    """Claim the row, send, and write the new id, in one transaction held across the send."""
    claim = f"replaying:{uuid.uuid4()}"
    sent: str | None = None
    try:
        async with store.engine.begin() as connection:
            if not await store.mark_replayed(connection, task_id, claim, time.time()):
                return ReplayOutcome(
                    task_id, refused="already replayed", reason="replayed meanwhile"
                )
            # The send path is synchronous (Celery's publish): off this event loop.
            result = await asyncio.to_thread(
                partial(task.apply_async, tuple(args), kwargs, **options)
            )
            sent = str(result.id)
            await _write_replayed_as(connection, task_id, sent)
    except Exception as exc:  # noqa: BLE001 - the reason is the answer; the row is kept
        if sent is None:
            return ReplayOutcome(
                task_id, refused="send failed", reason=f"{type(exc).__name__}: {exc}"
            )
        # Sent, but the mark went with the transaction: a "failed" answer now
        # would invite a second replay. Write it again on its own.
        try:
            async with store.engine.begin() as connection:
                await _write_replayed_as(connection, task_id, sent, at=time.time())
        except Exception as again:  # noqa: BLE001 - the task is sent: say so, and log the mark
            _log.error(
                "Dead letter %s was replayed as %s but could not be marked: %s: %s",
                task_id, sent, type(again).__name__, again,
            )  # fmt: skip
    return ReplayOutcome(task_id, replayed_as=sent)


async def _write_replayed_as(
    connection: AsyncConnection, task_id: str, sent: str, at: float | None = None
) -> None:
    values: dict[str, Any] = {"replayed_as": sent}
    if at is not None:
        values["replayed_at"] = at
    await connection.execute(
        dead_letters.update().where(dead_letters.c.task_id == task_id).values(**values)
    )


async def replay_where(
    store: DeadLetterStore, app: Celery, where: DeadLetterFilter, limit: int = 10_000
) -> ReplaySummary:
    """Send again every dead letter ``where`` matches that was not replayed yet, oldest first."""
    pending = DeadLetterFilter(
        task_name=where.task_name,
        error_type=where.error_type,
        since=where.since,
        until=where.until,
        pending=True,
    )
    outcomes = [
        await replay(store, app, task_id) for task_id in await store.task_ids(pending, limit)
    ]
    return ReplaySummary(tuple(outcomes))


def outcome_as_dict(outcome: ReplayOutcome) -> dict[str, Any]:
    return {
        "task_id": outcome.task_id,
        "sent": outcome.sent,
        "replayed_as": outcome.replayed_as,
        "refused": outcome.refused,
        "reason": outcome.reason,
    }
