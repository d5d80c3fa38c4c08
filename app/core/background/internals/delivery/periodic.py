"""``@periodic``: a beat schedule declared next to its task.

The entry goes into ``celery_app.conf.beat_schedule`` when the task module is
imported; ``celery -A app.core.background.celery_app beat`` imports every
discovered ``tasks.py`` at start, so it sees every entry. Each firing gets the
id ``{task name}:{period key}`` (``daily-2026-11-29``...) and takes a lease on
it kept until the period ends: two beats, or a beat restarted within the
period, never run the same period twice.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from typing import Any, TypeVar

from celery.schedules import crontab, schedule

from ..exceptions import TaskDefinitionError
from ..registry import PERIOD_HEADER
from .dedup import NAMED_PERIODS

TaskT = TypeVar("TaskT")


def period_for(schedule_: Any, period: str | None) -> str:
    """The period option of an entry: a named period, or the interval's length."""
    if period is not None:
        if period not in NAMED_PERIODS:
            raise TaskDefinitionError(
                f"unknown period {period!r}; valid: {', '.join(NAMED_PERIODS)}"
            )
        return period
    if isinstance(schedule_, crontab):
        return "minutely"  # a crontab fires at most once a minute
    if isinstance(schedule_, schedule):
        seconds = float(getattr(schedule_, "run_every").total_seconds())  # noqa: B009 - untyped
    elif isinstance(schedule_, timedelta):
        seconds = schedule_.total_seconds()
    elif isinstance(schedule_, int | float):
        seconds = float(schedule_)
    else:
        raise TaskDefinitionError(f"pass period= for a schedule of type {type(schedule_)}")
    if seconds <= 0:
        raise TaskDefinitionError("an interval schedule must be positive")
    return f"every:{seconds:g}"


def periodic(
    schedule_: Any,
    *,
    period: str | None = None,
    name: str | None = None,
    args: Sequence[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    options: Mapping[str, Any] | None = None,
) -> Callable[[TaskT], TaskT]:
    """Run the decorated task on ``schedule_`` (a ``crontab``, seconds, or ``timedelta``).

    ``period`` (``minutely``, ``hourly``, ``daily``, ``weekly``, ``monthly``)
    names the period that runs once; by default an interval schedule's own
    length, or a minute for a crontab. Put it above ``@simple_task``/``@db_task``.
    """

    def decorate(task: TaskT) -> TaskT:
        task_name = getattr(task, "name", None)
        if not isinstance(task_name, str):
            raise TaskDefinitionError("@periodic goes above @simple_task or @db_task")
        entry_options = dict(options or {})
        # The header asks the send path for the period's id and lease (delivery/dedup.py).
        entry_options["headers"] = {
            **(entry_options.get("headers") or {}),
            PERIOD_HEADER: period_for(schedule_, period),
        }
        entry = {
            "task": task_name,
            "schedule": schedule_,
            "args": tuple(args),
            "kwargs": dict(kwargs or {}),
            "options": entry_options,
        }
        app = task.app  # type: ignore[attr-defined]
        entry_name = name or task_name
        existing = app.conf.beat_schedule.get(entry_name)
        if existing is not None and existing["task"] != task_name:
            raise TaskDefinitionError(f"beat entry {entry_name!r} is declared twice")
        app.conf.beat_schedule = {**app.conf.beat_schedule, entry_name: entry}
        return task

    return decorate
