"""The modules the specification's Architecture section names hold the names it gives them."""

from __future__ import annotations

import importlib
import inspect

import pytest

import app.core.background as background
from app.core.background import celery_app

# The specification's map (its "Architecture" tree): module -> names it holds.
SPEC_MODULES = {
    "app.core.background.celery_app": ("celery_app",),
    "app.core.background.internals.base": ("BaseTask", "DatabaseTask"),
    "app.core.background.internals.decorators": ("simple_task", "db_task"),
    "app.core.background.internals.context": ("TaskContext",),
    "app.core.background.internals.session": ("DatabaseRuntime",),
    "app.core.background.internals.event_loop": ("WorkerEventLoop",),
    "app.core.background.internals.exceptions": (
        "TaskError",
        "NonRetriableTaskError",
        "is_retriable",
    ),
    "app.core.background.internals.retry": ("RetryPolicy", "RETRY_POLICIES"),
    "app.core.background.internals.monitoring": ("TaskMetrics", "Timer", "StatsCounter"),
    "app.core.background.internals.logging": ("TaskLogger",),
    "app.core.background.internals.testing": ("TaskTestContext", "mock_task_session"),
    "app.core.background.extras.circuit_breaker": ("CircuitBreaker", "CircuitBreakerOpen"),
}


@pytest.mark.parametrize(("module", "names"), SPEC_MODULES.items())
def test_each_module_holds_the_names_the_specification_gives_it(
    module: str, names: tuple[str, ...]
) -> None:
    loaded = importlib.import_module(module)
    missing = [name for name in names if name not in vars(loaded)]
    assert not missing, f"{module} lacks {missing}"
    for name in names:
        obj = vars(loaded)[name]
        if isinstance(obj, type) or inspect.isfunction(obj):
            # Defined there, not merely imported into it.
            assert obj.__module__ == module, f"{name} is defined in {obj.__module__}"


def test_every_framework_task_is_a_base_task() -> None:
    from app.core.background.internals.base import BaseTask
    from app.core.background.internals.registry import registry

    for module in celery_app.conf.include:
        importlib.import_module(module)

    assert background.BaseTask is BaseTask
    assert issubclass(background.DatabaseTask, BaseTask)
    tasks = [celery_app.tasks[name] for name in registry if name in celery_app.tasks]
    assert tasks
    assert all(isinstance(task, BaseTask) for task in tasks)


def test_the_old_class_name_is_gone() -> None:
    from app.core.background.internals import base

    assert not hasattr(base, "BackgroundTask")
    assert "BackgroundTask" not in background.__all__
