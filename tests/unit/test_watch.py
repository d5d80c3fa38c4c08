"""The watch command's rendering and exit codes, on scripted task states."""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from app.core.background.__main__ import build_parser
from app.core.background.internals.watch import (
    EXIT_FAILURE,
    EXIT_SUCCESS,
    EXIT_TIMEOUT,
    render_progress,
    watch,
)


@dataclass
class State:
    state: str
    info: Any = None


def scripted(*states: State) -> Any:
    sequence: Iterator[State] = iter(states)
    last: list[State] = []

    def fetch() -> State:
        last[:] = [next(sequence, last[0] if last else states[-1])]
        return last[0]

    return fetch


def test_progress_bar_line() -> None:
    line = render_progress({"done": 50, "total": 200, "percent": 25.0, "missing": 2})
    assert line == "[########......................]  25.0% 50/200  missing=2"
    assert render_progress({"stage": "indexing"}).endswith("?  %  stage=indexing")


def test_prints_each_change_then_the_result() -> None:
    out = io.StringIO()
    progress = {"done": 1, "total": 4, "percent": 25.0}
    code = watch(
        scripted(
            State("PENDING"),
            State("PROGRESS", progress),
            State("PROGRESS", progress),
            State("SUCCESS", {"status": "success", "processed": 4}),
        ),
        out,
        interval=0,
    )
    assert code == EXIT_SUCCESS
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("PENDING")
    assert lines[1] == "[########......................]  25.0% 1/4"
    assert lines[2] == "SUCCESS"
    assert '"processed": 4' in out.getvalue()


def test_live_mode_redraws_one_line() -> None:
    out = io.StringIO()
    watch(
        scripted(
            State("PROGRESS", {"done": 1, "total": 2, "percent": 50.0}),
            State("PROGRESS", {"done": 2, "total": 2, "percent": 100.0}),
            State("SUCCESS", 1),
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
    code = watch(scripted(State("FAILURE", RuntimeError("batch 3 failed"))), out, interval=0)
    assert code == EXIT_FAILURE
    assert out.getvalue() == "FAILURE  RuntimeError: batch 3 failed\n"


def test_gives_up_after_the_timeout() -> None:
    out = io.StringIO()
    code = watch(scripted(State("STARTED")), out, interval=0, timeout=0)
    assert code == EXIT_TIMEOUT
    assert out.getvalue().endswith("TIMEOUT  task still STARTED\n")


def test_command_line() -> None:
    args = build_parser().parse_args(["watch", "abc", "--interval", "0.1", "--no-live"])
    assert (args.task_id, args.interval, args.live, args.timeout) == ("abc", 0.1, False, None)
