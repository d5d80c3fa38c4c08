"""The runner's decision after a failure, and the dispatch timeout: the numbers, not the workers."""

from __future__ import annotations

from celery import Celery

from app.core.background import TaskValidationError, celery_app
from app.core.background.internals.delivery.publish import (
    DEFAULT_DISPATCH_TIMEOUT,
    _explain,
    dispatch_timeout,
)
from app.core.background.internals.retry import JITTER, delay_scale
from app.core.background.internals.runner import failure_outcome
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
