"""Finding every ``tasks.py`` under a package, and importing them at worker start.

Discovery only walks the file tree (no import, no side effect), so the list is
ready when the Celery app is built; Celery's loader imports the modules when a
worker starts. A module that fails to import stops the worker with an error
that names the file, and so does a ``tasks.py`` that could not be imported as
part of a package (its folder has no ``__init__.py``).
"""

from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType
from typing import Any

from celery.loaders.app import AppLoader

from .exceptions import TaskDiscoveryError

_SKIPPED_DIRS = frozenset({"__pycache__", "node_modules"})


def find_task_modules(
    package_dir: Path, package_name: str, module_name: str = "tasks"
) -> list[str]:
    """Dotted names of every ``<module_name>.py`` in packages under ``package_dir``.

    A folder is a package when it has an ``__init__.py``. A ``tasks.py`` in a
    folder that is not one (or below such a folder) raises
    ``TaskDiscoveryError`` naming the file: skipping it would leave its tasks
    unregistered, and a worker would drop their messages as unknown without
    saying why. Hidden folders, ``__pycache__`` and ``node_modules`` are not
    walked.
    """
    found: list[str] = []
    for current, dirs, files in os.walk(package_dir):
        here = Path(current)
        dirs[:] = sorted(d for d in dirs if d not in _SKIPPED_DIRS and not d.startswith("."))
        if f"{module_name}.py" not in files:
            continue
        parts = here.relative_to(package_dir).parts
        if (missing := _first_non_package(package_dir, parts)) is not None:
            raise TaskDiscoveryError(
                f"{here / f'{module_name}.py'} is not imported as a task module: "
                f"{missing} has no __init__.py. Add an empty __init__.py there (the "
                f"module is then {'.'.join((package_name, *parts, module_name))}), "
                "or rename the file if it holds no tasks"
            )
        found.append(".".join((package_name, *parts, module_name)))
    return sorted(found)


def _first_non_package(package_dir: Path, parts: tuple[str, ...]) -> Path | None:
    """The first folder from ``package_dir`` down through ``parts`` with no ``__init__.py``."""
    folders = [package_dir]
    for part in parts:
        folders.append(folders[-1] / part)
    return next((f for f in folders if not (f / "__init__.py").is_file()), None)


class TaskModuleLoader(AppLoader):
    """Celery's loader, with import errors that name the failing ``tasks.py``.

    It also maps the Redis result backend URLs to the framework's atomic
    variant (``result_backend.py``): Celery looks backend schemes up in the
    loader's ``override_backends`` before its own aliases.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.override_backends = dict.fromkeys(
            ("redis", "rediss"),
            "app.core.background.internals.transport.result_backend:AtomicRedisBackend",
        )

    def import_task_module(self, module: str) -> ModuleType:
        try:
            imported: ModuleType = super().import_task_module(module)
        except Exception as exc:
            raise TaskDiscoveryError(
                f"cannot import task module {module!r} ({_path_of(module)}): "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        return imported


def _path_of(module: str) -> str:
    return module.replace(".", os.sep) + ".py"
