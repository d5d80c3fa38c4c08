"""The runner's decision after a failure, and the dispatch timeout: the numbers, not the workers."""

from __future__ import annotations

from typing import Any

import pytest
from celery import Celery

from app.core.background import TaskValidationError, celery_app
from app.core.background.internals.delivery.publish import (
    DEFAULT_DISPATCH_TIMEOUT,
    _explain,
    dispatch_timeout,
)
from app.core.background.internals.retry import JITTER, delay_scale
from app.core.background.internals.runner import _runs_lost_before, failure_outcome
from app.core.background.internals.transport.result_backend import lost_runs
from tests.support import tasks


class ServiceDown(RuntimeError):
    retry_after = 5.0


def test_a_retriable_error_waits_the_policys_delay_scaled() -> None:
    task = tasks.always_fails  # standard policy
    nominal = task.policy.nominal_delay(0) * delay_scale(celery_app)
    reason, delay = failure_outcome(task, RuntimeError("boom"), 0)
    assert reason is None
    # The run's scale is 0.01 (tests/conftest.py): no floor of a second or more.
    assert nominal <= delay <= nominal * (1 + JITTER) < 1


def test_retry_after_is_a_floor_on_the_delay() -> None:
    reason, delay = failure_outcome(tasks.always_fails, ServiceDown("open"), 0)
    assert (reason, delay) == (None, 5.0)


def test_final_failures_say_why() -> None:
    task = tasks.always_fails
    assert failure_outcome(task, TaskValidationError("bad"), 0)[0] == "non-retriable"
    assert failure_outcome(task, RuntimeError("boom"), task.max_retries)[0] == "retries exhausted"
    assert failure_outcome(task, RuntimeError("boom"), task.max_retries - 1)[0] is None


def test_the_dispatch_timeout_is_the_setting_or_five_seconds() -> None:
    app = Celery("timeouts", set_as_current=False)
    assert dispatch_timeout(app) == DEFAULT_DISPATCH_TIMEOUT == 5.0
    app.conf.background_dispatch_timeout = 2
    assert dispatch_timeout(app) == 2.0


def test_a_dispatch_error_gives_the_cause_or_says_it_had_none() -> None:
    app = Celery("explain", set_as_current=False)
    with_text = _explain(app, "t.name", ["id-1"], OSError("refused"), 1.0)
    assert "t.name [id-1] was not sent within 1.0s" in with_text
    assert "OSError: refused --" in with_text
    assert "OSError: no message --" in _explain(app, "t.name", ["a", "b"], OSError(), 1.0)
    assert "[2 tasks]" in _explain(app, "t.name", ["a", "b"], OSError(), 1.0)


def _lost_before(task: Any, retries: int, seen: tuple[str, int] | None) -> str | None:
    """What ``_runs_lost_before`` says for a run of ``task`` (id "run-1", ``retries`` retries)."""
    task.push_request(id="run-1", retries=retries)
    token = lost_runs.set(seen)
    try:
        error = _runs_lost_before(task)
    finally:
        lost_runs.reset(token)
        task.pop_request()
    return None if error is None else str(error)


def test_lost_runs_count_as_attempts_up_to_the_policys_retries() -> None:
    task = tasks.always_fails  # standard policy: max_retries 3
    assert task.max_retries == 3
    assert _lost_before(task, 0, None) is None
    assert _lost_before(task, 0, ("run-1", 0)) is None
    assert _lost_before(task, 0, ("run-1", 3)) is None  # three lost, the fourth attempt runs
    assert _lost_before(task, 1, ("run-1", 2)) is None
    died = _lost_before(task, 0, ("run-1", 4))
    assert died is not None
    assert "died 4 time(s)" in died
    assert "max_retries=3" in died
    assert _lost_before(task, 2, ("run-1", 2)) is not None  # retries and deaths add up
    # Another run's count (a stale value in this context) is not this run's.
    assert _lost_before(task, 0, ("run-2", 9)) is None
    # No lost run: nothing to bound, even past the policy (a retry Celery sent anyway).
    assert _lost_before(task, 5, ("run-1", 0)) is None


def test_a_task_without_a_retry_limit_is_never_failed_for_lost_runs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    task = tasks.always_fails
    monkeypatch.setattr(task, "max_retries", None)
    assert _lost_before(task, 0, ("run-1", 50)) is None
