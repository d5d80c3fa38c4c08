"""One asyncio event loop per worker process, for async task bodies.

Celery calls tasks synchronously. Creating a loop per task (``asyncio.run``)
throws away every pooled connection each time and breaks loop-bound objects
such as asyncpg connections. Instead each process owns one loop, created on
first use (after the prefork pool has forked) and reused by every task.

Where the loop runs depends on the thread that runs tasks:

* The main thread (prefork pool processes, ``--pool solo``): the loop runs in
  that thread, ``run_until_complete`` per task, with no thread hand-off (a
  one-INSERT db task drained 19% faster on a prefork worker with concurrency 1
  once the hand-off was gone: 443 -> 530 tasks/s). Celery's soft
  time limit arrives there as ``SIGUSR1``, whose handler raises
  ``SoftTimeLimitExceeded`` wherever the thread is: inside a running loop it
  could land in a transport callback and be swallowed by the loop. So while a
  coroutine runs, the signal cancels it instead (the coroutine unwinds: rollback,
  connection release), and ``SoftTimeLimitExceeded`` is raised once it has.
  A body that blocks without awaiting (CPU work, a blocking call) is only
  cancelled at its next ``await``; the hard time limit still ends it.
* Other threads (``--pool threads``): one loop in a daemon thread serves every
  pool thread; a task's thread waits on a future, and an interruption of that
  wait cancels the coroutine the same way.
* The asyncio pool (``asyncio_pool.py``): the pool's own loop thread is
  adopted as the process's loop, and a task's coroutine runs inside the task's
  greenlet on that loop (the pool's hook says how), side by side with the others.

No library offers this hand-off, hence this module.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import os
import signal
import threading
from collections.abc import Callable, Coroutine
from types import FrameType
from typing import Any, TypeVar

from billiard.pool import SIG_SOFT_TIMEOUT, soft_timeout_sighandler
from celery.exceptions import SoftTimeLimitExceeded

T = TypeVar("T")

# A pool's hook (asyncio_pool.py): how to run a coroutine from the current
# greenlet when it is one of the pool's tasks, else None.
InlineRunner = Callable[[Coroutine[Any, Any, Any]], Any]
FindInlineRunner = Callable[[], InlineRunner | None]

# How long a cancelled coroutine may take to unwind after a soft time limit.
_CANCEL_GRACE_SECONDS = 5.0


class LoopThread:
    """An event loop running on a daemon thread of this process, started on first use.

    For code that must await from threads that have no loop of their own (or
    from inside another running loop): the threads pool's tasks, the lease
    store's queries. A forked child starts its own: the parent's thread does
    not exist there.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._pid: int | None = None

    @property
    def is_running(self) -> bool:
        return self._loop is not None and self._pid == os.getpid()

    def loop(self) -> asyncio.AbstractEventLoop:
        """The thread's loop, started on first use in this process."""
        with self._lock:
            if self._loop is None or self._pid != os.getpid():
                loop = asyncio.new_event_loop()
                ready = threading.Event()

                def serve() -> None:
                    asyncio.set_event_loop(loop)
                    loop.call_soon(ready.set)
                    loop.run_forever()

                thread = threading.Thread(target=serve, name=self.name, daemon=True)
                thread.start()
                ready.wait()
                self._loop, self._thread, self._pid = loop, thread, os.getpid()
            return self._loop

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the thread's loop and wait here for its result.

        If the wait is interrupted (Celery's ``SoftTimeLimitExceeded``, a
        timeout), the coroutine is cancelled and given time to clean up
        before the interruption propagates, so the next caller finds a clean loop.
        """
        loop = self.loop()
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError(f"{self.name}: run() called from inside its own loop")
        outcome: concurrent.futures.Future[T] = concurrent.futures.Future()
        started: list[asyncio.Task[T]] = []

        # The caller's context variables (the task's log fields) go with the coroutine.
        context = contextvars.copy_context()

        def start() -> None:
            task = loop.create_task(coro, context=context)
            started.append(task)
            task.add_done_callback(lambda done: _copy_outcome(done, outcome))

        loop.call_soon_threadsafe(start)
        try:
            return outcome.result(timeout)
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
        """Run ``final`` (for example disposing an engine), then stop the loop and its thread."""
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
        self.forget()

    def forget(self) -> None:
        """Drop a loop inherited through fork: it belongs to the parent's thread."""
        self._loop = self._thread = None
        self._pid = None


class WorkerEventLoop:
    """A long-lived event loop owned by one process: in its main thread or a daemon thread."""

    def __init__(self) -> None:
        # The daemon thread's loop (pool threads).
        self._loop_thread = LoopThread("background-event-loop")
        # The main thread's loop (prefork pool processes, solo).
        self._main_loop: asyncio.AbstractEventLoop | None = None
        self._main_pid: int | None = None
        # Set by a pool that runs tasks in greenlets on its own loop (asyncio_pool.py).
        self._find_inline: FindInlineRunner | None = None

    @property
    def is_running(self) -> bool:
        """Whether the daemon thread's loop runs in this process."""
        return self._loop_thread.is_running

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on this process's loop and return its result (see the module doc)."""
        if (inline := self.inline_runner()) is not None:
            return inline(coro)  # type: ignore[no-any-return]
        pid = os.getpid()
        if (
            threading.current_thread() is threading.main_thread()
            and not self.is_running
            and not _loop_running_here()
        ):
            return self._run_in_main_thread(coro)
        if self._main_loop is not None and self._main_pid == pid:
            coro.close()
            raise RuntimeError(
                "this process runs async tasks on its main thread's event loop: they "
                "cannot also run from another thread or from inside a running loop "
                "(the engine's connections belong to one loop)"
            )
        return self._loop_thread.run(coro)

    def run_blocking(self, call: Callable[[], T]) -> T:
        """``call()``, a blocking round trip, without holding this process's loop.

        Inside one of the asyncio pool's tasks the call runs in a thread of the
        loop's executor while the loop runs the other tasks (on the loop's
        thread the wait would hold every task of the process). Anywhere else it
        is simply called.
        """
        if (inline := self.inline_runner()) is not None:
            return inline(_in_a_thread(call))  # type: ignore[no-any-return]
        return call()

    def inline_runner(self) -> InlineRunner | None:
        """How to await a coroutine from here when this is one of the asyncio pool's tasks.

        None anywhere else (a prefork child, a thread, the API): code that
        has a blocking way and an awaitable one picks with it.
        """
        return self._find_inline() if self._find_inline is not None else None

    def adopt(self, loop_thread: LoopThread, find_inline: FindInlineRunner) -> None:
        """Use ``loop_thread``'s loop as this process's loop: a pool's own (asyncio_pool.py).

        ``find_inline()`` returns how to run a coroutine from the current
        greenlet when it is one of the pool's tasks, else None (the coroutine
        then goes to ``loop_thread`` as from any other thread).
        """
        self._loop_thread, self._find_inline = loop_thread, find_inline

    def _run_in_main_thread(self, coro: Coroutine[Any, Any, T]) -> T:
        loop = self._main_loop
        if loop is None or self._main_pid != os.getpid():
            loop = self._main_loop = asyncio.new_event_loop()
            self._main_pid = os.getpid()
            asyncio.set_event_loop(loop)
        task = loop.create_task(coro)
        limit_reached = False

        def cancel_on_soft_limit(_signum: int, _frame: FrameType | None) -> None:
            nonlocal limit_reached
            limit_reached = True
            # Safe in a signal handler: it only appends to the loop's queue
            # and writes a byte to wake it.
            loop.call_soon_threadsafe(task.cancel)

        # Only in a prefork pool process, where billiard's handler is the one
        # that raises; elsewhere SIGUSR1 means something else (Celery's
        # "dump stacks" in a solo worker) and is left alone.
        swap = SIG_SOFT_TIMEOUT is not None and (
            signal.getsignal(SIG_SOFT_TIMEOUT) is soft_timeout_sighandler
        )
        if swap:
            signal.signal(SIG_SOFT_TIMEOUT, cancel_on_soft_limit)
        try:
            return loop.run_until_complete(task)
        except BaseException as exc:
            if not task.done():
                # Interrupted while the coroutine waited (SystemExit from
                # billiard's SIGTERM handler on a terminate): let it unwind
                # now, or the next run of this loop would resume it.
                task.cancel()
                with contextlib.suppress(BaseException):
                    loop.run_until_complete(asyncio.wait({task}, timeout=_CANCEL_GRACE_SECONDS))
                raise
            if limit_reached:
                # Whatever the unwinding raised, the run ended on its time limit.
                raise SoftTimeLimitExceeded() from exc
            if isinstance(exc, asyncio.CancelledError):
                # Cancelled by something else: an ordinary, classifiable failure
                # (a BaseException would kill the pool process).
                raise concurrent.futures.CancelledError(str(exc) or "task cancelled") from exc
            raise
        finally:
            if swap:
                signal.signal(SIG_SOFT_TIMEOUT, soft_timeout_sighandler)

    def stop(self, final: Coroutine[Any, Any, Any] | None = None) -> None:
        """Run ``final`` (for example disposing an engine), then stop the loop."""
        main = self._main_loop if self._main_pid == os.getpid() else None
        if (
            main is not None
            and not main.is_running()
            and threading.current_thread() is threading.main_thread()
        ):
            if final is not None:
                # Shutdown is best effort: a failing dispose must not block the exit.
                with contextlib.suppress(Exception):
                    main.run_until_complete(asyncio.wait_for(final, 10))
                final = None
            main.close()
            self._main_loop = self._main_pid = None
        self._loop_thread.stop(final)

    def forget(self) -> None:
        """Drop loops inherited through fork: they belong to the parent (and its threads)."""
        self._loop_thread.forget()
        self._main_loop = self._main_pid = None
        self._find_inline = None


async def _in_a_thread(call: Callable[[], T]) -> T:
    """``call()`` in the loop's executor, finished even if the task is cancelled meanwhile."""
    return await held_until_done(asyncio.ensure_future(asyncio.to_thread(call)))


async def held_until_done(future: asyncio.Future[T]) -> T:
    """Wait for ``future``, a call in another thread, even if this task is cancelled meanwhile.

    A round trip in a thread cannot be stopped. A cancellation that arrives
    while it runs (a time limit, a shutdown) is held until it has ended and
    then lands at the task's next wait, as it would have if the call had held
    the loop: a result write is never left half-way with its task unwinding.
    """
    task = asyncio.current_task()
    held = 0
    while not future.done():
        try:
            await asyncio.shield(future)
        except asyncio.CancelledError:
            if task is None:
                raise
            task.uncancel()
            held += 1
    for _ in range(held):
        task.cancel()  # type: ignore[union-attr]  # held > 0 only with a task
    return future.result()


def _loop_running_here() -> bool:
    """Whether an event loop runs in this thread (a task called from async code)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _copy_outcome(task: asyncio.Task[T], outcome: concurrent.futures.Future[T]) -> None:
    if task.cancelled():
        outcome.cancel()
    elif (error := task.exception()) is not None:
        outcome.set_exception(error)
    else:
        outcome.set_result(task.result())


worker_loop = WorkerEventLoop()
os.register_at_fork(after_in_child=worker_loop.forget)
