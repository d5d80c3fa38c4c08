"""Autodiscovery of tasks.py modules: nested packages, no list to maintain."""

from __future__ import annotations

from pathlib import Path

from app.core.background import celery_app
from app.core.background.internals.discovery import find_task_modules


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


def test_skips_folders_that_are_not_packages(tmp_path: Path) -> None:
    make_package(tmp_path)
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "tasks.py").write_text("")
    make_package(tmp_path, ".hidden", tasks=True)
    assert find_task_modules(tmp_path, "pkg") == []


def test_the_app_includes_every_tasks_module_of_the_project() -> None:
    include = set(celery_app.conf.include)
    assert {
        "app.core.background.tasks",
        "app.entities.tasks",
        "app.notifications.tasks",
    } <= include
