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


def _tree_in_guide() -> set[str]:
    """The paths the guide's Architecture tree lists, relative to the package."""
    from pathlib import Path

    guide = Path(background.__file__).with_name("README.md").read_text()
    section = guide.split("## Architecture", 1)[1]
    block = section.split("```", 2)[1]
    paths: set[str] = set()
    folders: list[str] = []  # the folder open at each depth
    for line in block.splitlines()[2:]:  # after "app/core/background/"
        marker = max(line.find("├── "), line.find("└── "))
        if marker < 0:
            continue
        depth = marker // 4
        name = line[marker + 4 :].split("#", 1)[0].strip()
        del folders[depth:]
        if name.endswith("/"):
            folders.append(name.rstrip("/"))
        else:
            paths.add("/".join([*folders, name]))
    return paths


def test_the_guides_architecture_tree_is_the_package_on_disk() -> None:
    from pathlib import Path

    root = Path(background.__file__).parent
    on_disk = {
        str(path.relative_to(root))
        for path in root.rglob("*")
        if path.is_file()
        and path.suffix in (".py", ".md")
        and "__pycache__" not in path.parts
        and not (path.name == "__init__.py" and path.parent != root)
    }
    listed = _tree_in_guide()
    assert sorted(on_disk - listed) == [], "files missing from the guide's tree"
    assert sorted(listed - on_disk) == [], "the guide's tree lists files that do not exist"


def test_the_top_level_api_stays_small() -> None:
    # The everyday names; the rest lives in public modules named for their job.
    assert len(background.__all__) <= 26
    assert set(background.__all__) >= {
        "simple_task", "db_task", "TaskContext", "TaskTestContext", "mock_task_session",
        "TaskValidationError", "TaskNotFoundError", "TaskConfigurationError", "TaskError",
    }  # fmt: skip
