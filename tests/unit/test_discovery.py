"""Autodiscovery of tasks.py modules: nested packages, no list to maintain."""

from __future__ import annotations

import importlib
import sys
import uuid
from pathlib import Path

import pytest

from app.core.background import TaskDiscoveryError, celery_app
from app.core.background.internals.discovery import find_task_modules
from app.core.background.internals.registry import registry


def make_package(root: Path, *parts: str, tasks: bool = False) -> None:
    folder = root.joinpath(*parts)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "__init__.py").touch()
    if tasks:
        (folder / "tasks.py").write_text("")


def test_finds_tasks_in_nested_packages(tmp_path: Path) -> None:
    make_package(tmp_path, tasks=True)
    make_package(tmp_path, "billing", tasks=True)
    make_package(tmp_path, "billing", "invoices", "reminders", tasks=True)
    make_package(tmp_path, "billing", "invoices")
    make_package(tmp_path, "empty")
    assert find_task_modules(tmp_path, "pkg") == [
        "pkg.billing.invoices.reminders.tasks",
        "pkg.billing.tasks",
        "pkg.tasks",
    ]


def test_hidden_folders_are_not_walked(tmp_path: Path) -> None:
    make_package(tmp_path)
    make_package(tmp_path, ".hidden", tasks=True)
    (tmp_path / "__pycache__").mkdir()
    (tmp_path / "__pycache__" / "tasks.py").write_text("")
    assert find_task_modules(tmp_path, "pkg") == []


def test_a_tasks_module_outside_a_package_is_refused_with_its_path(tmp_path: Path) -> None:
    """A folder without __init__.py: its tasks.py would never be imported, so discovery stops."""
    make_package(tmp_path, tasks=True)
    (tmp_path / "billing").mkdir()
    (tmp_path / "billing" / "tasks.py").write_text("")
    with pytest.raises(TaskDiscoveryError) as raised:
        find_task_modules(tmp_path, "pkg")
    message = str(raised.value)
    assert str(tmp_path / "billing" / "tasks.py") in message
    assert f"{tmp_path / 'billing'} has no __init__.py" in message
    assert "the module is then pkg.billing.tasks" in message


def test_a_package_below_a_folder_that_is_not_one_is_refused_too(tmp_path: Path) -> None:
    make_package(tmp_path)
    (tmp_path / "plugins").mkdir()
    make_package(tmp_path, "plugins", "mail", tasks=True)
    with pytest.raises(TaskDiscoveryError, match=r"plugins has no __init__.py"):
        find_task_modules(tmp_path, "pkg")


def test_every_module_found_is_importable_and_registers_its_task(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The names found are what Celery imports: each must load, and its task with it."""
    root = tmp_path / "discpkg"
    make_package(root)
    make_package(root, "billing")
    make_package(root, "billing", "invoices", tasks=True)
    task_name = f"unit.discovery.{uuid.uuid4().hex[:8]}"
    (root / "billing" / "invoices" / "tasks.py").write_text(
        "from app.core.background import TaskContext, simple_task\n\n\n"
        f"@simple_task(name={task_name!r})\n"
        "def remind(ctx: TaskContext) -> None: ...\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        modules = find_task_modules(root, "discpkg")
        assert modules == ["discpkg.billing.invoices.tasks"]
        for module in modules:
            importlib.import_module(module)
        assert task_name in celery_app.tasks
    finally:
        registry.release(task_name)
        celery_app.tasks.pop(task_name, None)
        for name in [m for m in sys.modules if m.startswith("discpkg")]:
            del sys.modules[name]


def test_the_app_includes_every_tasks_module_of_the_project() -> None:
    include = set(celery_app.conf.include)
    assert {
        "app.core.background.tasks",
        "app.entities.tasks",
        "app.notifications.tasks",
    } <= include
