"""The per-process event loop that runs async task bodies (no broker needed)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import signal
import threading
from collections.abc import Iterator

import pytest

from app.core.background.internals.event_loop import WorkerEventLoop


class Interrupted(BaseException):
    """What billiard's SIGTERM handler raises (SystemExit), without exiting pytest."""


@pytest.fixture
def worker_loop() -> Iterator[WorkerEventLoop]:
    loop = WorkerEventLoop()
    yield loop
    loop.stop()


def test_the_main_thread_runs_bodies_on_one_loop_of_its_own(worker_loop: WorkerEventLoop) -> None:
    async def which_loop() -> tuple[asyncio.AbstractEventLoop, threading.Thread]:
        return asyncio.get_running_loop(), threading.current_thread()

    first_loop, first_thread = worker_loop.run(which_loop())
    second_loop, _ = worker_loop.run(which_loop())
    assert first_loop is second_loop
    assert first_thread is threading.main_thread()
    assert not worker_loop.is_running  # no loop thread was started


def test_a_call_from_async_code_goes_to_the_loop_thread(worker_loop: WorkerEventLoop) -> None:
    """``task(...)`` inside a running loop (an async test or endpoint) must not nest loops."""

    async def name() -> str:
        return threading.current_thread().name

    async def caller() -> str:
        return worker_loop.run(name())

    assert asyncio.run(caller()) == "background-event-loop"


def test_a_cancellation_that_is_no_time_limit_is_an_ordinary_failure(
    worker_loop: WorkerEventLoop,
) -> None:
    async def cancelled_inside() -> None:
        waiting = asyncio.ensure_future(asyncio.sleep(10))
        waiting.cancel()
        await waiting

    with pytest.raises(concurrent.futures.CancelledError) as raised:
        worker_loop.run(cancelled_inside())
    assert isinstance(raised.value, Exception)  # classified and retried, not fatal


def test_an_interruption_unwinds_the_body_before_it_propagates(
    worker_loop: WorkerEventLoop,
) -> None:
    unwound: list[str] = []

    async def waits() -> None:
        try:
            await asyncio.sleep(10)
        finally:
            unwound.append("rolled back")

    def interrupt(_signum: int, _frame: object) -> None:
        raise Interrupted

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 0.2)
    try:
        with pytest.raises(Interrupted):
            worker_loop.run(waits())
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert unwound == ["rolled back"]

    async def next_body() -> str:
        return "clean loop"

    assert worker_loop.run(next_body()) == "clean loop"
    assert unwound == ["rolled back"]  # the interrupted body is not resumed


_caller_value = contextvars.ContextVar[str]("caller_value")


def test_a_body_on_the_loop_thread_sees_the_callers_context_variables(
    worker_loop: WorkerEventLoop,
) -> None:
    """The threads pool: the task's log fields (a context variable) go with its coroutine."""

    async def read() -> tuple[str, str]:
        return _caller_value.get("unset"), threading.current_thread().name

    def pool_thread() -> tuple[str, str]:
        _caller_value.set("set by the task's thread")
        return worker_loop.run(read())

    with concurrent.futures.ThreadPoolExecutor(1) as threads:
        seen = threads.submit(pool_thread).result(timeout=10)
    assert seen == ("set by the task's thread", "background-event-loop")
