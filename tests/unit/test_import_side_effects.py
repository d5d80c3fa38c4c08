"""Importing a model module builds no Celery app, reads no settings and writes no file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

PROBE = """
import json, sys
import {module}
print(json.dumps({{name: name in sys.modules for name in {watched!r}}}))
"""
WATCHED = ["celery", "app.core.background", "app.core.background.celery_app"]


def imported_by(module: str, cwd: Path) -> dict[str, bool]:
    """Which of ``WATCHED`` a fresh interpreter has loaded after importing ``module``."""
    code = PROBE.format(module=module, watched=WATCHED)
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, check=True,
        env={"PYTHONPATH": str(Path(__file__).resolve().parents[2]), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    loaded: dict[str, bool] = json.loads(out.stdout)
    return loaded


def test_a_model_module_imports_neither_celery_nor_the_framework(tmp_path: Path) -> None:
    loaded = imported_by("app.entities.models", tmp_path)
    assert loaded == dict.fromkeys(WATCHED, False)
    assert list(tmp_path.iterdir()) == []  # no ./.data
