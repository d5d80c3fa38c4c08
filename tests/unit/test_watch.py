"""The watch command's rendering and exit codes, on scripted task statuses."""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Iterator
from typing import Any

from app.core.background.__main__ import build_parser
from app.core.background.internals.operations.status import TaskState, TaskStatus
from app.core.background.internals.operations.watch import (
    EXIT_FAILURE,
    EXIT_SUCCESS,
    EXIT_TIMEOUT,
    EXIT_UNKNOWN,
    render_progress,
    watch,
)


def status(state: TaskState, **fields: Any) -> TaskStatus:
    return TaskStatus(task_id="t-1", state=state, **fields)


def scripted(*statuses: TaskStatus) -> Callable[[], TaskStatus]:
    """Each call returns the next status; the last one is repeated."""
    sequence: Iterator[TaskStatus] = iter(statuses)
    last = [statuses[0]]

    def fetch() -> TaskStatus:
        last[0] = next(sequence, last[0])
        return last[0]

    return fetch


def test_progress_bar_line() -> None:
    line = render_progress({"done": 50, "total": 200, "percent": 25.0, "missing": 2})
    assert line == "[########......................]  25.0% 50/200  missing=2"
    assert render_progress({"stage": "indexing"}).endswith("?  %  stage=indexing")


def test_prints_each_change_then_the_result_in_the_apis_words() -> None:
    out = io.StringIO()
    progress = {"done": 1, "total": 4, "percent": 25.0}
    code = watch(
        scripted(
            status("pending"),
            status("progress", progress=progress),
            status("progress", progress=progress),
            status("success", result={"status": "success", "processed": 4}),
        ),
        out,
        interval=0,
    )
    assert code == EXIT_SUCCESS
    lines = out.getvalue().splitlines()
    assert lines[0] == "pending"
    assert lines[1] == "[########......................]  25.0% 1/4"
    assert lines[2] == "success"
    assert '"processed": 4' in out.getvalue()


def test_live_mode_redraws_one_line() -> None:
    out = io.StringIO()
    watch(
        scripted(
            status("progress", progress={"done": 1, "total": 2, "percent": 50.0}),
            status("progress", progress={"done": 2, "total": 2, "percent": 100.0}),
            status("success", result=1),
        ),
        out,
        interval=0,
        live=True,
    )
    text = out.getvalue()
    assert text.count("\r") == 2
    assert text.split("\n")[0].endswith("100.0% 2/2")


def test_a_failure_exits_1_with_the_error() -> None:
    out = io.StringIO()
    failed = status("failure", error_type="RuntimeError", error_message="batch 3 failed")
    assert watch(scripted(failed), out, interval=0) == EXIT_FAILURE
    assert out.getvalue() == "failure  RuntimeError: batch 3 failed\n"


def test_gives_up_after_the_timeout() -> None:
    out = io.StringIO()
    code = watch(scripted(status("started")), out, interval=0, timeout=0)
    assert code == EXIT_TIMEOUT
    assert out.getvalue().endswith("timeout  task still started\n")


def test_an_unknown_id_exits_3_after_its_grace_period() -> None:
    out, err = io.StringIO(), io.StringIO()
    began = time.monotonic()
    code = watch(scripted(status("unknown")), out, interval=0.01, unknown_timeout=0.2, err=err)
    assert code == EXIT_UNKNOWN
    assert 0.2 <= time.monotonic() - began < 5
    assert err.getvalue() == ("unknown task id t-1: never dispatched, or its result has expired\n")


def test_an_id_that_appears_within_the_grace_period_is_followed() -> None:
    out = io.StringIO()
    fetch = scripted(status("unknown"), status("pending"), status("success", result=None))
    assert watch(fetch, out, interval=0, unknown_timeout=60) == EXIT_SUCCESS
    assert out.getvalue().splitlines()[1:3] == ["pending", "success"]


def test_command_line() -> None:
    args = build_parser().parse_args(["watch", "abc", "--interval", "0.1", "--no-live"])
    assert (args.task_id, args.interval, args.live, args.timeout) == ("abc", 0.1, False, None)
    assert args.unknown_timeout == 5.0
