"""Declaring limits: every mistake fails the import with a message that says what to write."""

from __future__ import annotations

import inspect
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from app.core.background import TaskContext, TaskDefinitionError, celery_app, simple_task
from app.core.background.internals.admission.limits import (
    call_arguments,
    declared_limits,
    parse_rate,
)
from app.core.background.internals.exceptions import TaskArgumentsRefusedError
from app.core.background.internals.monitoring import TaskMetrics
from app.core.background.internals.observability import metrics_hook
from app.core.background.internals.registry import registry


@pytest.fixture
def task_name() -> Iterator[str]:
    name = f"unit.{uuid.uuid4().hex[:8]}"
    yield name
    registry.release(name)
    celery_app.tasks.pop(name, None)


@pytest.mark.parametrize(
    ("text", "per_second", "burst"),
    [
        ("50/s", 50.0, 5),
        ("1/s", 1.0, 1),
        ("120/m", 2.0, 1),
        ("3600/h", 1.0, 1),
        (" 1000 / s ", 1000.0, 100),
        ("0.5/s", 0.5, 1),
    ],
)
def test_rates_per_second_minute_and_hour(text: str, per_second: float, burst: int) -> None:
    rate = parse_rate("t", text)
    assert rate.per_second == pytest.approx(per_second)
    assert rate.interval == pytest.approx(1 / per_second)
    assert rate.burst == burst


@pytest.mark.parametrize("text", ["50", "50/d", "0/s", "-1/s", "fast", 50, "50/s/s"])
def test_a_rate_that_is_not_n_per_unit_is_refused(task_name: str, text: Any) -> None:
    with pytest.raises(TaskDefinitionError, match="rate_limit must look like '50/s'"):
        simple_task(name=task_name, rate_limit=text)(lambda ctx: None)


@pytest.mark.parametrize("cap", [0, -2, 1.5, True, "3"])
def test_a_cap_that_is_not_a_positive_whole_number_is_refused(task_name: str, cap: Any) -> None:
    with pytest.raises(TaskDefinitionError, match="concurrency must be a whole number"):
        simple_task(name=task_name, concurrency=cap)(lambda ctx: None)


def test_a_key_without_its_limit_is_refused(task_name: str) -> None:
    with pytest.raises(TaskDefinitionError, match="concurrency_key needs concurrency"):
        simple_task(name=task_name, concurrency_key=lambda **_: "k")(lambda ctx: None)
    with pytest.raises(TaskDefinitionError, match="rate_limit_key needs rate_limit"):
        simple_task(name=task_name, rate_limit_key=lambda **_: "k")(lambda ctx: None)


def test_a_key_that_cannot_take_the_tasks_arguments_is_refused_at_import(task_name: str) -> None:
    with pytest.raises(TaskDefinitionError, match=r"tenant_id, report.*\*\*_ for the rest"):

        @simple_task(name=task_name, concurrency=3, concurrency_key=lambda tenant_id: tenant_id)
        def export(ctx: TaskContext, tenant_id: int, report: str) -> None: ...


def test_a_key_that_is_not_a_function_is_refused(task_name: str) -> None:
    with pytest.raises(TaskDefinitionError, match="must be a function of the task's arguments"):
        simple_task(name=task_name, concurrency=3, concurrency_key="tenant_id")(lambda ctx: None)


def test_a_key_without_a_signature_is_checked_when_it_is_called(task_name: str) -> None:
    # ``dict`` has no signature to check at import; what it returns is checked per run.
    @simple_task(name=task_name, concurrency=1, concurrency_key=dict)
    def body(ctx: TaskContext, tenant_id: int) -> None: ...

    assert body.limits is not None
    with pytest.raises(TaskArgumentsRefusedError, match="returned a dict"):
        body.limits.concurrency_scope({"tenant_id": 1})


def test_keys_get_the_arguments_by_name_with_defaults() -> None:
    def export(ctx: TaskContext, tenant_id: int, report: str = "daily", **extra: Any) -> None: ...

    signature = inspect.signature(export)
    limits = declared_limits(
        "exports.build",
        signature,
        concurrency=3,
        concurrency_key=lambda tenant_id, report, **_: f"{tenant_id}/{report}",
        rate_limit="10/s",
        rate_limit_key=lambda colour=None, **_: colour,
    )
    assert limits is not None
    arguments = call_arguments(signature, (7,), {"colour": "red"})
    assert arguments == {"tenant_id": 7, "report": "daily", "colour": "red"}
    assert limits.concurrency_scope(arguments) == ("concurrency:exports.build:7/daily", "7/daily")
    assert limits.rate_scope(arguments) == ("rate:exports.build:red", "red")


def test_a_key_that_returns_no_key_or_raises_refuses_the_run() -> None:
    def export(ctx: TaskContext, tenant_id: Any) -> None: ...

    signature = inspect.signature(export)
    limits = declared_limits(
        "exports.build", signature, concurrency=1, concurrency_key=lambda tenant_id: tenant_id
    )
    assert limits is not None
    with pytest.raises(TaskArgumentsRefusedError, match="must return a str or an int"):
        limits.concurrency_scope({"tenant_id": None})
    failing = declared_limits(
        "exports.build", signature, concurrency=1, concurrency_key=lambda tenant_id: 1 / 0
    )
    assert failing is not None
    with pytest.raises(TaskArgumentsRefusedError, match="ZeroDivisionError"):
        failing.concurrency_scope({"tenant_id": 1})


def test_a_task_without_limits_has_none(task_name: str) -> None:
    @simple_task(name=task_name)
    def body(ctx: TaskContext) -> None: ...

    assert body.limits is None


def test_deferrals_are_counted_per_task_limit_and_key(monkeypatch: pytest.MonkeyPatch) -> None:
    metrics = TaskMetrics(CollectorRegistry())
    monkeypatch.setattr(metrics_hook, "task_metrics", lambda: metrics)
    ctx = TaskContext(task_id="t1", task_name="exports.build", queue="default")
    hook = metrics_hook.MetricsHook()
    hook.on_deferred(ctx, "concurrency", "tenant-7", 0.5)
    hook.on_deferred(ctx, "concurrency", "tenant-7", 0.5)
    labels = ("exports.build", "default", "concurrency", "tenant-7")
    assert metrics.deferred.labels(*labels)._value.get() == 2
