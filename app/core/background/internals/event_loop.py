"""One asyncio event loop per worker process, for async task bodies.

Celery calls tasks synchronously. Creating a loop per task (``asyncio.run``)
throws away every pooled connection each time and breaks loop-bound objects
such as asyncpg connections. Instead each process owns one loop, started in a
daemon thread on first use (after the prefork pool has forked) and reused by
every task and every pool thread of that process.

The loop runs in its own thread rather than in the task's thread because
Celery's soft time limit is delivered as an exception raised by a signal
handler in the task's thread. Raised inside a running loop, it could land in a
callback and be swallowed by the loop; raised while we wait on a future, we
catch it, cancel the coroutine, let it unwind (rollback, connection release),
and only then re-raise it. No library offers this hand-off, hence this module.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

# How long a cancelled coroutine may take to unwind after a soft time limit.
_CANCEL_GRACE_SECONDS = 5.0


class WorkerEventLoop:
    """A long-lived event loop in a background thread, owned by one process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._pid: int | None = None

    @property
    def is_running(self) -> bool:
        return self._loop is not None and self._pid == os.getpid()

    def loop(self) -> asyncio.AbstractEventLoop:
        """The process's loop, started on first use."""
        loop = self._loop
        if loop is not None and self._pid == os.getpid():
            return loop
        with self._lock:
            if self._loop is None or self._pid != os.getpid():
                self._start()
            assert self._loop is not None
            return self._loop

    def _start(self) -> None:
        loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            loop.run_forever()

        thread = threading.Thread(target=run, name="background-event-loop", daemon=True)
        thread.start()
        ready.wait()
        self._loop, self._thread, self._pid = loop, thread, os.getpid()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the loop and wait for its result in the calling thread.

        If the wait is interrupted (Celery's ``SoftTimeLimitExceeded``), the
        coroutine is cancelled and given time to clean up before the
        interruption propagates, so the next task finds a clean loop.
        """
        loop = self.loop()
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("WorkerEventLoop.run() called from inside its own loop")
        outcome: concurrent.futures.Future[T] = concurrent.futures.Future()
        started: list[asyncio.Task[T]] = []

        def start() -> None:
            task = loop.create_task(coro)
            started.append(task)
            task.add_done_callback(lambda done: _copy_outcome(done, outcome))

        loop.call_soon_threadsafe(start)
        try:
            return outcome.result()
        except BaseException:
            if not outcome.done():
                unwound = threading.Event()

                def cancel() -> None:
                    # Runs after start(): call_soon_threadsafe keeps order.
                    task = started[0]
                    task.add_done_callback(lambda _: unwound.set())
                    task.cancel()

                loop.call_soon_threadsafe(cancel)
                unwound.wait(_CANCEL_GRACE_SECONDS)
            raise

    def stop(self, final: Coroutine[Any, Any, Any] | None = None) -> None:
        """Run ``final`` (for example disposing an engine), then stop the loop."""
        if not self.is_running:
            if final is not None:
                final.close()
            return
        loop, thread = self._loop, self._thread
        assert loop is not None
        assert thread is not None
        if final is not None:
            # Shutdown is best effort: a failing dispose must not block the exit.
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(final, loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5)
        if not thread.is_alive():
            loop.close()
        self._loop = self._thread = None
        self._pid = None

    def forget(self) -> None:
        """Drop a loop inherited through fork: its thread does not exist in the child."""
        self._loop = self._thread = None
        self._pid = None


def _copy_outcome(task: asyncio.Task[T], outcome: concurrent.futures.Future[T]) -> None:
    if task.cancelled():
        outcome.cancel()
    elif (error := task.exception()) is not None:
        outcome.set_exception(error)
    else:
        outcome.set_result(task.result())


worker_loop = WorkerEventLoop()
os.register_at_fork(after_in_child=worker_loop.forget)
