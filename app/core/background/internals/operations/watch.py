"""Follow a task from a terminal: a live progress bar until it ends.

Reads the task's status with ``get_task_status``, exactly as
``GET /tasks/{task_id}`` does, so it prints the API's states (``pending``,
``progress``, ``success``...) and works from any machine that can reach the
result backend. ``progress`` carries what ``ctx.log_progress`` published
(``done``, ``total``, ``percent`` and the task's own metrics).

An id the backend knows nothing about (the API's 404) is given a short grace
period, ``unknown_timeout``: a task sent with ``delay_via_outbox`` is unknown
until the relay sends it. After that the watcher stops with ``EXIT_UNKNOWN``
instead of waiting for a task that will never come.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from typing import Any, TextIO

from .status import TaskStatus

# Exit codes of ``watch``: the task succeeded, failed (or was revoked), the
# watcher gave up waiting, or the id is unknown.
EXIT_SUCCESS, EXIT_FAILURE, EXIT_TIMEOUT, EXIT_UNKNOWN = 0, 1, 2, 3
UNKNOWN_TIMEOUT = 5.0

BAR_WIDTH = 30
_PROGRESS_KEYS = ("done", "total", "percent")


def unknown_message(task_id: str) -> str:
    return f"unknown task id {task_id}: never dispatched, or its result has expired"


def render(status: TaskStatus) -> str:
    """One line for a task's state: a bar for ``progress``, else the state's name."""
    if status.state == "progress" and status.progress is not None:
        return render_progress(status.progress)
    if status.state == "unknown":
        return "unknown  (not dispatched yet?)"
    if status.state == "retry":
        return f"retry    {_error_text(status)}"
    return status.state


def render_progress(metrics: Mapping[str, Any]) -> str:
    percent = metrics.get("percent")
    if isinstance(percent, int | float):
        filled = round(BAR_WIDTH * min(max(float(percent), 0.0), 100.0) / 100)
        head = f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {float(percent):5.1f}%"
    else:
        head = f"[{'?' * BAR_WIDTH}]   ?  %"
    done, total = metrics.get("done"), metrics.get("total")
    count = f" {done}/{total}" if done is not None and total is not None else ""
    extra = " ".join(f"{k}={v}" for k, v in metrics.items() if k not in _PROGRESS_KEYS)
    return f"{head}{count}" + (f"  {extra}" if extra else "")


def watch(
    fetch: Callable[[], TaskStatus],
    out: TextIO,
    *,
    interval: float = 0.5,
    timeout: float | None = None,
    unknown_timeout: float = UNKNOWN_TIMEOUT,
    live: bool = False,
    err: TextIO | None = None,
) -> int:
    """Print the task's progress until it ends; the exit code (``EXIT_*``).

    ``live`` redraws one line in place (a terminal); otherwise a new line is
    printed whenever the rendered state changes (a log file, a pipe). Errors
    (an unknown id) go to ``err`` (default: ``out``).
    """
    started = time.monotonic()
    deadline = None if timeout is None else started + timeout
    shown = ""
    while True:
        status = fetch()
        if status.finished:
            if live and shown:
                out.write("\n")
            return _print_outcome(status, out)
        now = time.monotonic()
        if status.state == "unknown" and now - started >= unknown_timeout:
            if live and shown:
                out.write("\n")
            out.flush()
            (err or out).write(unknown_message(status.task_id) + "\n")
            return EXIT_UNKNOWN
        line = render(status)
        if line != shown:
            if live:
                out.write("\r" + line.ljust(len(shown)))
            else:
                out.write(line + "\n")
            out.flush()
            shown = line
        if deadline is not None and now >= deadline:
            out.write(("\n" if live else "") + f"timeout  task still {status.state}\n")
            return EXIT_TIMEOUT
        time.sleep(interval)


def _print_outcome(status: TaskStatus, out: TextIO) -> int:
    if status.state == "success":
        out.write("success\n" + json.dumps(status.result, indent=2, default=str) + "\n")
        out.flush()
        return EXIT_SUCCESS
    out.write(f"{status.state}  {_error_text(status)}\n".rstrip() + "\n")
    out.flush()
    return EXIT_FAILURE


def _error_text(status: TaskStatus) -> str:
    if status.error_type is None:
        return status.error_message or ""
    return f"{status.error_type}: {status.error_message or ''}".rstrip()
