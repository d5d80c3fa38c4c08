"""The asyncio pool's mechanism in this process, without a broker (internals/asyncio_pool.py).

Jobs are handed over as Celery's consumer does (``pool.apply_async`` with
its callbacks), with a target standing in for Celery's tracer: it runs a
coroutine through ``worker_loop.run``, as ``runner.execute`` does. Without a
hub (no broker), the pool calls the callbacks from its own threads; the
tests collect them and wait on events, every wait bounded. The real worker's
tests are in tests/integration/test_asyncio_pool.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from celery.exceptions import SoftTimeLimitExceeded
from kombu.asynchronous import Hub

from app.core.background import celery_app
from app.core.background.internals import asyncio_pool
from app.core.background.internals.event_loop import worker_loop
from app.core.background.internals.session import database
from app.core.background.pool import AsyncioPool
from tests.support import tasks_asyncio_pool

WAIT = 10.0
ASYNC_TASK = tasks_asyncio_pool.sleep.name
SYNC_TASK = tasks_asyncio_pool.sync_sleep.name

_which = contextvars.ContextVar[str]("which")


class Outcomes:
    """What the pool reported for one job, through Celery's three callbacks."""

    def __init__(self) -> None:
        self.results: list[Any] = []
        self.errors: list[Any] = []
        self.timeouts: list[tuple[bool, float]] = []
        self.ended = threading.Event()
        self.hard_limit = threading.Event()

    def callbacks(self) -> dict[str, Callable[..., None]]:
        return {
            "callback": self._result,
            "error_callback": self._error,
            "timeout_callback": self._timeout,
        }

    def _result(self, result: Any) -> None:
        self.results.append(result)
        self.ended.set()

    def _error(self, einfo: Any) -> None:
        self.errors.append(einfo)
        self.ended.set()

    def _timeout(self, soft: bool, seconds: float) -> None:
        self.timeouts.append((soft, seconds))
        if not soft:
            self.hard_limit.set()


@pytest.fixture
def pool(monkeypatch: pytest.MonkeyPatch) -> Iterator[AsyncioPool]:
    # The pool adopts the process's loop and sizes its engine: put them back after.
    monkeypatch.setattr(worker_loop, "_loop_thread", worker_loop._loop_thread)
    monkeypatch.setattr(worker_loop, "_find_inline", None)
    monkeypatch.setattr(database, "_concurrency", 1)
    # The collector of this process (pytest's) stays as it is: see test_garbage_collector_*.
    monkeypatch.setattr(asyncio_pool, "_tuned_in", os.getpid())
    pool = AsyncioPool(20, app=celery_app)
    pool.start()
    try:
        yield pool
    finally:
        pool.stop()
        worker_loop.stop()


def apply(
    pool: AsyncioPool,
    body: Callable[[], Any],
    *,
    task_name: str = ASYNC_TASK,
    **options: Any,
) -> tuple[Any, Outcomes]:
    """Hand ``body`` (a coroutine function or a plain one) to the pool as one job."""
    outcomes = Outcomes()

    def target(_name: str) -> Any:
        # Celery's tracer never raises: it returns what went wrong.
        try:
            result = body()
            return worker_loop.run(result) if asyncio.iscoroutine(result) else result
        except Exception as exc:  # noqa: BLE001 - reported as the run's outcome
            return type(exc).__name__

    job = pool.apply_async(target, args=(task_name,), **outcomes.callbacks(), **options)
    return job, outcomes


def test_runs_await_side_by_side_each_in_its_own_context(pool: AsyncioPool) -> None:
    arrived: list[int] = []
    everyone_in = asyncio.Event()  # bound to the pool's loop at its first wait

    def body(n: int) -> Callable[[], Any]:
        async def run() -> tuple[str, str]:
            _which.set(f"run {n}")
            # No run goes on until all 20 are in flight at once on the one loop.
            arrived.append(n)
            if len(arrived) == 20:
                everyone_in.set()
            await asyncio.wait_for(everyone_in.wait(), WAIT)
            return _which.get(), threading.current_thread().name

        return run

    jobs = [apply(pool, body(n)) for n in range(20)]
    for _, outcomes in jobs:
        assert outcomes.ended.wait(WAIT)
    assert [outcomes.results for _, outcomes in jobs] == [
        [(f"run {n}", "background-asyncio-pool")] for n in range(20)
    ]


def test_a_blocking_round_trip_leaves_the_loop_to_the_other_runs(pool: AsyncioPool) -> None:
    """A result write (``run_blocking``) waits in a thread: the loop runs the others meanwhile."""
    released = threading.Event()

    def writes_then_ends() -> str:
        worker_loop.run_blocking(lambda: released.wait(WAIT))
        return "written"

    _, writer = apply(pool, writes_then_ends)
    _, other = apply(pool, lambda: asyncio.sleep(0, "other ran"))
    assert other.ended.wait(WAIT)
    assert other.results == ["other ran"]
    assert not writer.ended.is_set()
    released.set()
    assert writer.ended.wait(WAIT)
    assert writer.results == ["written"]


def test_a_soft_limit_during_a_round_trip_lands_once_it_has_ended(pool: AsyncioPool) -> None:
    """The write is never cut short: the cancellation waits for it, then lands at the next await."""
    released, written = threading.Event(), threading.Event()

    def write() -> None:
        released.wait(WAIT)
        written.set()

    def body() -> Any:
        worker_loop.run_blocking(write)
        return asyncio.sleep(WAIT * 2)

    _, outcomes = apply(pool, body, soft_timeout=0.1)
    assert not outcomes.ended.wait(0.5)  # the limit passed during the write: held
    released.set()
    assert outcomes.ended.wait(WAIT)
    assert written.is_set()
    assert outcomes.results == [SoftTimeLimitExceeded.__name__]
    assert outcomes.timeouts == [(True, 0.1)]


def test_a_sync_task_runs_in_a_thread_off_the_loop(pool: AsyncioPool) -> None:
    _, outcomes = apply(pool, lambda: threading.current_thread().name, task_name=SYNC_TASK)
    assert outcomes.ended.wait(WAIT)
    (name,) = outcomes.results
    assert name.startswith("background-sync-task")


def test_the_soft_limit_cancels_the_body_which_fails_with_its_own_error(
    pool: AsyncioPool,
) -> None:
    unwound = threading.Event()

    async def slow() -> None:
        try:
            await asyncio.sleep(WAIT * 2)
        finally:
            unwound.set()

    _, outcomes = apply(pool, slow, soft_timeout=0.2)
    assert outcomes.ended.wait(WAIT)
    assert unwound.is_set()
    assert outcomes.results == [SoftTimeLimitExceeded.__name__]
    assert outcomes.timeouts == [(True, 0.2)]


def test_the_hard_limit_goes_to_celerys_timeout_callback_alone_and_the_rest_is_ignored(
    pool: AsyncioPool,
) -> None:
    """Celery's timeout callback stores the failure and acknowledges: nothing else is reported."""

    async def stubborn() -> str:
        with contextlib.suppress(asyncio.CancelledError):  # swallows its soft limit
            await asyncio.sleep(WAIT * 2)
        await asyncio.sleep(WAIT * 2)
        return "finished"

    _, outcomes = apply(pool, stubborn, soft_timeout=0.1, timeout=0.3)
    assert outcomes.hard_limit.wait(WAIT)
    pool.stop()  # waits for the abandoned run to unwind
    assert outcomes.timeouts == [(True, 0.1), (False, 0.3)]
    assert outcomes.results == outcomes.errors == []


def test_a_terminated_run_ends_and_reports_nothing(pool: AsyncioPool) -> None:
    started = threading.Event()

    async def waits() -> None:
        started.set()
        await asyncio.sleep(WAIT * 2)

    job, outcomes = apply(pool, waits)
    assert started.wait(WAIT)
    job.terminate()
    pool.stop()  # returns once the run has ended
    assert outcomes.results == outcomes.errors == []
    assert not outcomes.ended.is_set()


def test_a_warm_stop_waits_for_the_runs_in_flight(pool: AsyncioPool) -> None:
    started = threading.Event()

    async def short() -> str:
        started.set()
        await asyncio.sleep(0.2)
        return "done"

    _, outcomes = apply(pool, short)
    assert started.wait(WAIT)
    pool.stop()
    assert outcomes.results == ["done"]


def test_an_outcome_reaches_the_hub_as_a_poll_event_so_its_ack_runs_before_the_next_fetch(
    pool: AsyncioPool,
) -> None:
    """Celery acknowledges with ``hub.call_soon``; kombu decides to fetch in ``on_tick``.

    An outcome passed on from the top of a turn (``call_soon``) would queue
    its ack after that turn's ``on_tick``: the turn then polls with no fetch
    in flight, until its timeout (a second), and the freed slot waits.
    Passed on as a poll event, the ack runs at the top of the next turn,
    before its ``on_tick``.
    """
    hub = Hub()
    pool.register_with_event_loop(hub)
    acked: list[bool] = []
    ticks_after_outcome: list[bool] = []

    def on_success(_result: Any) -> None:
        hub.call_soon(lambda: acked.append(True))  # as Celery's call_soon_ack
        ticks_after_outcome.clear()

    def on_tick() -> None:
        if outcome_seen.is_set():
            ticks_after_outcome.append(bool(acked))

    outcome_seen = threading.Event()
    hub.on_tick.add(on_tick)

    def target(_name: str) -> str:
        return "done"

    def callback(result: Any) -> None:
        on_success(result)
        outcome_seen.set()

    pool.apply_async(target, args=(ASYNC_TASK,), callback=callback)
    turns = hub.create_loop()
    for _ in range(20):
        next(turns)
        if ticks_after_outcome:
            break
    assert ticks_after_outcome[:1] == [True]
    hub.close()


def _collector_after_start(threshold: tuple[int, ...] | None = None) -> list[int]:
    """(young threshold, objects frozen) in a fresh process after a pool started there."""
    code = (
        "import gc, sys\n"
        + (f"gc.set_threshold(*{threshold!r})\n" if threshold else "")
        + "from app.core.background import celery_app\n"
        "from app.core.background.pool import AsyncioPool\n"
        "pool = AsyncioPool(2, app=celery_app)\n"
        "pool.start()\n"
        "print(gc.get_threshold()[0], gc.get_freeze_count())\n"
        "pool.stop()\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    return [int(value) for value in done.stdout.split()]


def test_garbage_collector_a_started_pool_freezes_start_up_objects_and_collects_less_often() -> (
    None
):
    young, frozen = _collector_after_start()
    assert young == asyncio_pool.YOUNG_GENERATION_THRESHOLD
    # The app and its libraries: tens of thousands of objects.
    assert frozen > 10_000


@pytest.mark.parametrize("threshold", [(0,), (500, 10, 10), (50_000, 10, 10)])
def test_garbage_collector_a_threshold_of_ones_own_is_kept_if_it_collects_less_often(
    threshold: tuple[int, ...],
) -> None:
    young, _ = _collector_after_start(threshold)
    expected = (
        threshold[0] if threshold[0] in (0, 50_000) else asyncio_pool.YOUNG_GENERATION_THRESHOLD
    )
    assert young == expected
