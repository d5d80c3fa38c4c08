"""Finding every ``tasks.py`` under a package, and importing them at worker start.

Discovery only walks the file tree (no import, no side effect), so the list is
ready when the Celery app is built; Celery's loader imports the modules when a
worker starts. A module that fails to import stops the worker with an error
that names the file.
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

    A folder is a package when it has an ``__init__.py``; the walk does not
    enter folders that are not packages, nor hidden ones.
    """
    found: list[str] = []
    for current, dirs, files in os.walk(package_dir):
        here = Path(current)
        dirs[:] = sorted(
            d
            for d in dirs
            if d not in _SKIPPED_DIRS
            and not d.startswith(".")
            and (here / d / "__init__.py").is_file()
        )
        if f"{module_name}.py" in files:
            parts = here.relative_to(package_dir).parts
            found.append(".".join((package_name, *parts, module_name)))
    return sorted(found)


class TaskModuleLoader(AppLoader):
    """Celery's loader, with import errors that name the failing ``tasks.py``.

    It also maps the Redis result backend URLs to the framework's atomic
    variant (``result_backend.py``): Celery looks backend schemes up in the
    loader's ``override_backends`` before its own aliases.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.override_backends = dict.fromkeys(
            ("redis", "rediss"), "app.core.background.internals.result_backend:AtomicRedisBackend"
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
