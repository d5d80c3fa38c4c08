"""The framework's concurrent async mode (issue 14), as the benchmark starts it.

The mode is the framework's asyncio pool, chosen with Celery's own options::

    CELERY_CUSTOM_WORKER_POOL=app.core.background.pool:AsyncioPool \\
        celery -A app.core.background.celery_app worker -P custom -c N

The suites ``db``, ``raw``, ``io`` and ``io_db`` add sides in that mode
(``--async-pool``, the pool as ``module:Class``; ``none`` leaves them out).
Where the pool does not import (a branch without it), those sides are
skipped with a note and the rest of the suite runs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # bench.drain imports the framework's app: not before the services are set
    from bench.drain import Topology
    from bench.report import Report

# What ``-P custom`` loads (Celery reads it when the worker imports its pools).
POOL_ENV = "CELERY_CUSTOM_WORKER_POOL"
# The framework's pool, as ``-P custom`` loads it.
DEFAULT_POOL = "app.core.background.pool:AsyncioPool"


def unavailable(pool: str) -> str | None:
    """Why ``pool`` (``module:Class``) cannot be used here, or None when it can."""
    module_name, _, attribute = pool.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - missing or broken: either way, a note
        return f"{module_name} does not import ({type(exc).__name__}: {exc})"
    if attribute and not hasattr(module, attribute):
        return f"{module_name} has no {attribute}"
    return None


def chosen_pool(option: str | None, report: Report, suite: str) -> str | None:
    """The pool to run the async mode with, or None (left out, or a note says why not)."""
    if not option or option.lower() == "none":
        return None
    why = unavailable(option)
    if why is not None:
        report.notes.append(
            f"{suite}: the framework's async mode (-P custom, {option}) skipped: {why}"
        )
        return None
    return option


def topology(pool: str, label: str, concurrency: int, count: int = 2) -> Topology:
    """``count`` workers of ``-P custom -c concurrency`` with ``pool`` as the custom pool."""
    from bench.drain import Topology

    return Topology(label, "custom", concurrency, count, env={POOL_ENV: pool})
