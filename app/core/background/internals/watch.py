"""Follow a task from a terminal: a live progress bar until it ends.

Reads the task's state from the result backend, the same place
``GET /tasks/{task_id}`` reads it, so it works from any machine that can
reach the backend. ``PROGRESS`` states carry what ``ctx.log_progress``
published (``done``, ``total``, ``percent`` and the task's own metrics).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol, TextIO

# Exit codes of ``watch``: the task succeeded, failed (or was revoked), or the
# watcher gave up waiting.
EXIT_SUCCESS, EXIT_FAILURE, EXIT_TIMEOUT = 0, 1, 2

BAR_WIDTH = 30
_ENDED = ("SUCCESS", "FAILURE", "REVOKED")
_PROGRESS_KEYS = ("done", "total", "percent")


class TaskState(Protocol):
    """What the watcher reads: a Celery ``AsyncResult`` fits."""

    @property
    def state(self) -> str: ...

    @property
    def info(self) -> Any: ...


def render(state: str, info: Any) -> str:
    """One line for a task's state: a bar for ``PROGRESS``, else the state's name."""
    if state == "PROGRESS" and isinstance(info, Mapping):
        return render_progress(info)
    if state == "PENDING":
        return "PENDING  (queued, or unknown to the result backend)"
    if state == "RETRY":
        return f"RETRY    {_error_text(info)}"
    return state


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
    fetch: Callable[[], TaskState],
    out: TextIO,
    *,
    interval: float = 0.5,
    timeout: float | None = None,
    live: bool = False,
) -> int:
    """Print the task's progress until it ends; the exit code (``EXIT_*``).

    ``live`` redraws one line in place (a terminal); otherwise a new line is
    printed whenever the rendered state changes (a log file, a pipe).
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    shown = ""
    while True:
        result = fetch()
        state, info = str(result.state), result.info
        if state in _ENDED:
            if live and shown:
                out.write("\n")
            return _print_outcome(state, info, out)
        line = render(state, info)
        if line != shown:
            if live:
                out.write("\r" + line.ljust(len(shown)))
            else:
                out.write(line + "\n")
            out.flush()
            shown = line
        if deadline is not None and time.monotonic() >= deadline:
            out.write(("\n" if live else "") + f"TIMEOUT  task still {state}\n")
            return EXIT_TIMEOUT
        time.sleep(interval)


def _print_outcome(state: str, info: Any, out: TextIO) -> int:
    if state == "SUCCESS":
        out.write("SUCCESS\n" + json.dumps(info, indent=2, default=str) + "\n")
        out.flush()
        return EXIT_SUCCESS
    out.write(f"{state}  {_error_text(info)}\n")
    out.flush()
    return EXIT_FAILURE


def _error_text(info: Any) -> str:
    if isinstance(info, BaseException):
        return f"{type(info).__name__}: {info}"
    return "" if info is None else str(info)
