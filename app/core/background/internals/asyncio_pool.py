"""A Celery pool that runs async task bodies side by side on one event loop.

Users select it through the public module (``app.core.background.pool``) with
Celery's own hook for an out-of-tree pool: ``-P custom`` and
``CELERY_CUSTOM_WORKER_POOL=app.core.background.pool:AsyncioPool`` (``-P``
itself only takes the names Celery knows). ``--concurrency N`` tasks run at
once in the ONE worker process; the consumer prefetches
``worker_prefetch_multiplier x N`` messages (N with the framework's
multiplier of 1), so the process never holds more than it can run.

How a task runs
---------------
The worker's consumer (main thread) hands each message to ``on_apply`` with
Celery's tracer as ``target``. For an async task (``@db_task``, async
``@simple_task``) the pool starts an asyncio task on its loop (a thread of
the worker process) that runs the unmodified tracer inside a greenlet
(``_TaskGreenlet``): Celery's request stack, signals, result storing and the
framework's ``runner.execute`` run there as they do on any pool. When
``execute`` reaches the body's coroutine, ``worker_loop.run`` finds that it is
inside such a greenlet and hands the coroutine to
``_TaskGreenlet.run_coroutine``, which drives it *inside the greenlet*
(``coro.send``) and passes every future the coroutine waits on up to the loop
(a greenlet switch): the asyncio task waits on that future exactly as if it
awaited the coroutine itself. While one task waits, the loop runs the others.
This is SQLAlchemy's ``greenlet_spawn``/``await_only`` turned around, and it
nests with it.

Because the coroutine's frames run in the task's greenlet, Celery's
greenlet-local request stack (``task.request``, ``current_task``) is right
inside the body too, and the greenlet shares the asyncio task's
``contextvars`` context (as SQLAlchemy's greenlets do): a context variable set
by the runner (the task's log fields) is seen by the body, per task, with any
number interleaved.

What it costs: the synchronous parts of a run (Celery's tracer, signals,
hooks) run on the loop's thread and hold it while they run, like any sync
code in an async program. The result backend's writes (STARTED, then the
outcome: two Redis round trips per run) do not: the backend sees that it
runs in one of this pool's tasks (``worker_loop.inline_runner``) and makes
them from the loop with an asyncio client, the writes of every run waiting
at that moment in one pipeline (``transport/loop_writes.py``); the run waits
for its reply as for any other await. Outcomes (acks, retries, failures) are passed back to
the worker's main thread, which runs Celery's callbacks as it does for
prefork, so the broker connection is only used from that thread; on Redis
the acks of one turn of its loop go in one transaction and one fetch refills
every free slot (``transport/redis_broker.py``). Measured with 100 runs of
``await asyncio.sleep(0.1)`` per process, one process profiled
(``bench/profile.py --async-mode 100``): with the writes on the loop and one
fetch and one ack per message, the loop thread waited on Redis for most of
each run and the main thread spent most of its time in those round trips;
two processes drained 595 tasks/s, 1,246 after these changes.

Sync task bodies (a ``@simple_task`` on a plain function, plain Celery tasks)
would block the loop and every task on it: they run in a thread of a thread
pool of up to N threads instead (what ``-P threads`` does), with the same
callbacks.

Time limits: the soft limit cancels the one asyncio task that ran over (its
body unwinds: rollback, connection release) and the run fails with
``SoftTimeLimitExceeded`` (retried or not by its policy, as on prefork); the
hard limit fails the run with ``TimeLimitExceeded`` through Celery's timeout
callback (stored failure, ``task_failure``, message acknowledged) and cancels
that task for good, ignoring whatever it does after. Neither can interrupt
a body that blocks the loop without awaiting (a sync call): such a stretch is
logged ("Task blocked the event loop", with its length) when it ends. Time
limits of sync tasks (in threads) are not enforced, as on ``-P threads``.

Shutdown: a warm shutdown waits for the tasks in flight (each bounded by its
time limits), then the worker's shutdown signal disposes the engine on this
loop and stops it. A cold shutdown cancels the tasks in flight without
acknowledging them: the broker delivers them again.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import gc
import logging
import os
import threading
import time
from collections.abc import Callable, Coroutine, Generator
from typing import Any, TypeVar

from billiard.einfo import ExceptionInfo
from celery.concurrency.base import BasePool, apply_target
from celery.exceptions import SoftTimeLimitExceeded
from greenlet import getcurrent, greenlet

from .event_loop import LoopThread, worker_loop
from .logging import FRAMEWORK_LOGGER_NAME
from .session import database

T = TypeVar("T")

_log = logging.getLogger(FRAMEWORK_LOGGER_NAME)

# The Celery setting (BACKGROUND_LOOP_BLOCK_WARNING) naming the seconds a
# stretch of synchronous work in one task may hold the loop before it is logged.
BLOCK_WARNING_SETTING = "background_loop_block_warning"
DEFAULT_BLOCK_WARNING = 0.1
# How long a cold shutdown lets cancelled tasks unwind.
_CANCEL_GRACE_SECONDS = 5.0
# Returned by a task greenlet's run when the tracer is done.
_DONE = object()


class _Abandoned(BaseException):
    """Ends a run whose outcome Celery no longer waits for (hard time limit, cold shutdown).

    A BaseException: the framework does not classify it (no retry is sent) and
    Celery's tracer stores nothing for it, as if the process had been killed.
    """


class _Job:
    """One message the pool runs: the tracer call and Celery's callbacks for it."""

    __slots__ = (
        "__weakref__", "abandoned", "args", "callback", "error_callback", "kwargs",
        "loop", "reported", "soft_limit_reached", "soft_timeout", "target", "task",
        "task_id", "task_name", "timeout", "timeout_callback", "timers",
    )  # fmt: skip

    def __init__(
        self,
        target: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        callbacks: dict[str, Callable[..., Any] | None],
        soft_timeout: float | None,
        timeout: float | None,
        task_id: str,
    ) -> None:
        self.target = target
        self.args = args
        self.kwargs = kwargs
        self.callback = callbacks["callback"]
        self.timeout_callback = callbacks["timeout_callback"]
        self.error_callback = callbacks["error_callback"]
        self.soft_timeout = soft_timeout
        self.timeout = timeout
        self.task_id = task_id
        # Celery's tracer takes the task's name first.
        self.task_name = str(args[0]) if args else "?"
        # The pool's loop for an async run; None for a sync run (in a thread).
        self.loop: asyncio.AbstractEventLoop | None = None
        self.task: asyncio.Task[None] | None = None
        self.timers: list[asyncio.TimerHandle] = []
        self.soft_limit_reached = False
        # Cancelled for good (hard time limit, cold shutdown, revoke): see _Abandoned.
        self.abandoned = False
        # Set once an outcome went to Celery (result, or the hard time limit):
        # anything the run does after that is ignored.
        self.reported = False

    def terminate(self, signal: Any = None) -> None:
        """Celery's cold shutdown and ``revoke(terminate=True)``: end this run, report nothing.

        (Celery calls this on what ``on_apply`` returned; ``terminate_job``
        only gets a process id, the same for every run here.) A sync run in a
        thread cannot be interrupted: it goes on.
        """
        loop = self.loop
        if loop is None or self.reported:
            return
        self.reported = self.abandoned = True
        with contextlib.suppress(RuntimeError):  # the loop is closed
            loop.call_soon_threadsafe(self.cancel)

    def cancel(self) -> None:
        """On the loop: cancel the asyncio task (if it started)."""
        if self.task is not None:
            self.task.cancel()


class _TaskGreenlet(greenlet):  # type: ignore[misc]  # greenlet ships no type hints
    """Runs one job's tracer; drives its coroutine, handing every wait to the loop."""

    def __init__(self, run: Callable[[], object], loop_greenlet: greenlet, job: _Job) -> None:
        super().__init__(run, loop_greenlet)
        # One context per asyncio task, shared with the greenlet (as SQLAlchemy does).
        self.gr_context = loop_greenlet.gr_context
        self.loop_greenlet = loop_greenlet
        self.job = job

    def run_coroutine(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` to the end from this greenlet; the loop runs others meanwhile."""
        send: bool = True
        value: Any = None
        while True:
            try:
                yielded = coro.send(value) if send else coro.throw(value)
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]
            except asyncio.CancelledError as exc:
                raise self._instead_of_cancellation(exc) from exc
            # The asyncio task waits on ``yielded`` (a future, or None for a bare
            # yield) and sends back what the coroutine is to receive.
            send, value = self.loop_greenlet.switch(yielded)

    def _instead_of_cancellation(self, exc: asyncio.CancelledError) -> BaseException:
        """What the tracer sees when the pool cancelled the body (see the module doc)."""
        job = self.job
        if job.abandoned:
            return _Abandoned(job.task_id)
        # The cancellation is turned into an error, not passed on: the asyncio
        # task goes on (storing the outcome), so it is no longer "being cancelled".
        if job.task is not None:
            job.task.uncancel()
        if job.soft_limit_reached:
            return SoftTimeLimitExceeded()
        # Cancelled by something else: an ordinary, classifiable failure
        # (a BaseException would be reported as a lost worker).
        return concurrent.futures.CancelledError(str(exc) or "task cancelled")


def _inline_runner() -> Callable[[Coroutine[Any, Any, Any]], Any] | None:
    """``worker_loop``'s hook: the current task greenlet's runner, if inside one."""
    current = getcurrent()
    return current.run_coroutine if isinstance(current, _TaskGreenlet) else None


class AsyncioPool(BasePool):
    """Celery pool: async tasks side by side on one event loop, sync tasks in threads."""

    body_can_be_buffer = True
    # Stopping waits for the tasks in flight: not from inside a signal handler.
    signal_safe = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limit: int = int(self.limit or 1)
        self._loop_thread = LoopThread("background-asyncio-pool")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._threads = concurrent.futures.ThreadPoolExecutor(
            max_workers=self.limit, thread_name_prefix="background-sync-task"
        )
        self._hub: Any = None
        # Outcomes waiting for the main thread, in order: (callback, args).
        self._lock = threading.Lock()
        # Notified when a run ends or an outcome waits: a warm shutdown waits on it.
        self._changed = threading.Condition(self._lock)
        self._outcomes: collections.deque[tuple[Callable[..., Any], tuple[Any, ...]]] = (
            collections.deque()
        )
        self._drain_posted = False
        # The pipe that wakes the hub for outcomes (register_with_event_loop).
        self._wake_read: int | None = None
        self._wake_write: int | None = None
        self._jobs: set[_Job] = set()
        self._sync_in_flight = 0
        conf = self.app.conf if self.app is not None else {}
        self._block_warning = float(conf.get(BLOCK_WARNING_SETTING) or DEFAULT_BLOCK_WARNING)

    # -- lifecycle ----------------------------------------------------------

    def on_start(self) -> None:
        self._loop = self._loop_thread.loop()
        # Async bodies (and the engine's connections) live on this loop; the
        # worker's shutdown signal disposes the engine here and stops it.
        worker_loop.adopt(self._loop_thread, _inline_runner)
        # Up to ``limit`` db tasks hold a connection at once (capped: see session.py).
        database.expect_concurrency(self.limit)
        _tune_garbage_collector()

    def register_with_event_loop(self, loop: Any) -> None:
        """Celery's hub (main thread): outcomes are passed back to it through a pipe.

        A pipe the hub polls, as prefork's result pipe is, not ``hub.call_soon``:
        Celery acknowledges with ``call_soon`` too, and a callback that a
        ``call_soon`` callback adds waits for the hub's next poll (up to its
        one-second timeout) instead of running before it. Handled as a poll
        event, an outcome's ack runs at the top of the next turn, before the
        turn decides whether to fetch (measured: at concurrency 1 this pool
        ran one 100 ms task per second through ``call_soon``, 9.5 through the pipe).
        """
        self._hub = loop
        if self._wake_read is None:
            self._wake_read, self._wake_write = os.pipe()
            os.set_blocking(self._wake_read, False)
            os.set_blocking(self._wake_write, False)
        loop.add_reader(self._wake_read, self._on_outcomes)

    def on_stop(self) -> None:
        """Warm shutdown: wait for every task in flight, passing on its outcome."""
        while True:
            self._drain()
            with self._changed:
                if not self._jobs and self._sync_in_flight == 0:
                    break
                if not self._outcomes:
                    # Woken by an ending run; the timeout only re-checks.
                    self._changed.wait(timeout=1.0)
        self._drain()
        self._threads.shutdown(wait=True)
        self._close_wake_pipe()

    def _close_wake_pipe(self) -> None:
        if self._hub is not None and self._wake_read is not None:
            with contextlib.suppress(Exception):  # the hub may be closed already
                self._hub.remove_reader(self._wake_read)
        for fd in (self._wake_read, self._wake_write):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._wake_read = self._wake_write = None

    def on_terminate(self) -> None:
        """Cold shutdown: cancel the tasks in flight without acknowledging them."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with self._lock:
            jobs = list(self._jobs)
        for job in jobs:
            # Nothing of it reaches Celery, and nothing is retried: the broker
            # delivers the unacknowledged message again.
            job.reported = job.abandoned = True
        done = threading.Event()
        with contextlib.suppress(RuntimeError):  # the loop has stopped already
            loop.call_soon_threadsafe(_cancel_and_wait, jobs, done)
            done.wait(_CANCEL_GRACE_SECONDS + 1)
        self._threads.shutdown(wait=False, cancel_futures=True)

    @property
    def num_processes(self) -> int:
        return self.limit

    def _get_info(self) -> dict[str, Any]:
        """``celery inspect stats``: Celery's two keys, and the runs in flight now."""
        with self._lock:
            return {
                "implementation": f"{type(self).__module__}:{type(self).__name__}",
                "max-concurrency": self.limit,
                "running": len(self._jobs),
                "threads-running": self._sync_in_flight,
            }

    # -- applying a task ------------------------------------------------------

    def on_apply(  # type: ignore[override]  # celery-types: None; Celery keeps the value
        self,
        target: Callable[..., Any],
        args: tuple[Any, ...] | None = None,
        kwargs: dict[str, Any] | None = None,
        callback: Callable[..., Any] | None = None,
        accept_callback: Callable[..., Any] | None = None,
        timeout_callback: Callable[..., Any] | None = None,
        error_callback: Callable[..., Any] | None = None,
        soft_timeout: float | None = None,
        timeout: float | None = None,
        correlation_id: str | None = None,
        **_: Any,
    ) -> _Job:
        callbacks = {
            "callback": callback, "timeout_callback": timeout_callback,
            "error_callback": error_callback,
        }  # fmt: skip
        job = _Job(
            target, tuple(args or ()), dict(kwargs or {}), callbacks, soft_timeout, timeout,
            correlation_id or "",
        )  # fmt: skip
        # Accepted now: the loop (or a thread) starts it at once; the consumer
        # never hands over more than the concurrency (prefetch).
        if accept_callback is not None:
            accept_callback(os.getpid(), time.monotonic())
        if self._runs_on_loop(job.task_name):
            self._start_on_loop(job)
        else:
            self._start_in_thread(job)
        # Celery keeps a weak reference, and calls its ``terminate``.
        return job

    def terminate_job(self, pid: int, signal: Any = None) -> None:
        """Every run has this process's id: Celery then calls the run's own ``terminate``."""

    def _runs_on_loop(self, task_name: str) -> bool:
        task = self.app.tasks.get(task_name) if self.app is not None else None
        return bool(getattr(task, "is_async", False))

    def _start_on_loop(self, job: _Job) -> None:
        assert self._loop is not None, "the pool was not started"
        job.loop = self._loop
        with self._lock:
            self._jobs.add(job)
        self._loop.call_soon_threadsafe(self._start, job)

    def _start_in_thread(self, job: _Job) -> None:
        with self._lock:
            self._sync_in_flight += 1
        self._threads.submit(self._run_in_thread, job)

    def _run_in_thread(self, job: _Job) -> None:
        try:
            apply_target(job.target, job.args, job.kwargs, callback=_reporter(self, job))
        finally:
            with self._changed:
                self._sync_in_flight -= 1
                self._changed.notify_all()

    # -- on the loop's thread ---------------------------------------------------

    def _start(self, job: _Job) -> None:
        loop = self._loop
        assert loop is not None
        if job.abandoned:  # terminated before it started
            self._forget(job)
            return
        job.task = loop.create_task(self._run(job), name=f"task {job.task_id}")
        if job.soft_timeout:
            job.timers.append(loop.call_later(job.soft_timeout, self._on_soft_limit, job))
        if job.timeout:
            job.timers.append(loop.call_later(job.timeout, self._on_hard_limit, job))

    async def _run(self, job: _Job) -> None:
        try:
            await _GreenletRun(self, job)
        except BaseException:  # noqa: BLE001 - the pool's own failure: the run is lost
            if not job.reported and job.error_callback is not None:
                job.reported = True
                self.report(job.error_callback, ExceptionInfo())
        finally:
            for timer in job.timers:
                timer.cancel()
            self._forget(job)

    def _forget(self, job: _Job) -> None:
        with self._changed:
            self._jobs.discard(job)
            self._changed.notify_all()

    def _on_soft_limit(self, job: _Job) -> None:
        if job.task is None or job.task.done() or job.reported:
            return
        job.soft_limit_reached = True
        if job.timeout_callback is not None:
            self.report(job.timeout_callback, True, job.soft_timeout)
        job.task.cancel()

    def _on_hard_limit(self, job: _Job) -> None:
        if job.task is None or job.task.done() or job.reported:
            return
        job.reported = job.abandoned = True
        # Celery's timeout callback logs "Hard time limit (Ns) exceeded for
        # <task>[<id>]", stores TimeLimitExceeded, sends task_failure (which
        # frees a task_id lease) and acknowledges the message. (billiard also
        # calls the error callback for prefork, which does all of it a second time.)
        if job.timeout_callback is not None:
            self.report(job.timeout_callback, False, job.timeout)
        job.task.cancel()

    def held_the_loop(self, job: _Job, started: float) -> None:
        """A greenlet gave the loop back after ``started``: log a long stretch."""
        held = time.monotonic() - started
        if held >= self._block_warning:
            _log.warning(
                "Task blocked the event loop",
                extra={
                    "fields": {
                        "task_id": job.task_id,
                        "task_name": job.task_name,
                        "blocked_for": round(held, 6),
                    }
                },
            )

    # -- outcomes, back to the main thread --------------------------------------

    def report(self, callback: Callable[..., Any], *args: Any) -> None:
        """Run Celery's ``callback(*args)`` on the worker's main thread (its hub)."""
        hub = self._hub
        if hub is None:
            # No hub (a broker without an asynchronous transport: the embedded
            # file broker): call it here, as the threads pool does.
            _call(callback, args)
            return
        with self._changed:
            self._outcomes.append((callback, args))
            post = not self._drain_posted
            self._drain_posted = True
            self._changed.notify_all()
        if post and self._wake_write is not None:
            with contextlib.suppress(BlockingIOError, OSError):  # full: a wake is pending anyway
                os.write(self._wake_write, b"\0")

    def _on_outcomes(self) -> None:
        """The hub's reader of the wake pipe: empty it, then pass the outcomes on."""
        assert self._wake_read is not None, "registered with the hub"
        with contextlib.suppress(BlockingIOError):  # emptied
            while os.read(self._wake_read, 4096):
                pass
        self._drain()

    def _drain(self) -> None:
        with self._lock:
            outcomes, self._outcomes = self._outcomes, collections.deque()
            self._drain_posted = False
        for callback, args in outcomes:
            _call(callback, args)


def _reporter(pool: AsyncioPool, job: _Job) -> Callable[[Any], None]:
    """The ``callback`` given to Celery's ``apply_target``: report the result once."""

    def report(result: Any) -> None:
        if job.reported:
            return
        job.reported = True
        if job.callback is not None:
            pool.report(job.callback, result)

    return report


class _GreenletRun:
    """Awaitable: the job's tracer in a greenlet, every wait of its coroutine awaited here."""

    __slots__ = ("job", "pool")

    def __init__(self, pool: AsyncioPool, job: _Job) -> None:
        self.pool = pool
        self.job = job

    def __await__(self) -> Generator[Any, Any, None]:
        job, pool = self.job, self.pool

        def run() -> object:
            apply_target(job.target, job.args, job.kwargs, callback=_reporter(pool, job))
            return _DONE

        task_greenlet = _TaskGreenlet(run, getcurrent(), job)
        started = time.monotonic()
        out = task_greenlet.switch()
        pool.held_the_loop(job, started)
        while out is not _DONE:
            try:
                sent = yield out
            except GeneratorExit:
                # The asyncio task is being destroyed (the loop closes): end the greenlet.
                task_greenlet.throw()
                raise
            except BaseException as exc:  # noqa: BLE001 - handed to the coroutine
                started = time.monotonic()
                out = task_greenlet.switch(False, exc)
            else:
                started = time.monotonic()
                out = task_greenlet.switch(True, sent)
            pool.held_the_loop(job, started)


# The process whose collector was tuned (``_tune_garbage_collector``).
_tuned_in: int | None = None
# Net allocations of tracked objects between two collections of the youngest
# generation (CPython's default is 700). A higher setting of one's own is
# kept, and so is 0 (automatic collection off).
YOUNG_GENERATION_THRESHOLD = 10_000


def _tune_garbage_collector() -> None:
    """Fewer garbage collections for a process that keeps many runs in flight.

    With 100 runs in flight nearly every object a run makes is still alive
    when the youngest generation is collected (CPython collects it after 700
    net allocations), so the collection finds nothing, the objects are
    promoted, and full collections come often and traverse the ~130,000
    objects of the worker's start-up (the app, its tasks, the libraries).
    Two changes, once per process (a pool started again in tests finds it
    done): the start-up objects are frozen (``gc.freeze``, after collecting
    the garbage that exists now, so none of it is kept for good), and the
    youngest generation is collected after ``YOUNG_GENERATION_THRESHOLD``
    net allocations (the older generations' ratios unchanged: a collection
    now takes a few milliseconds, not a run's worth of waits).

    Measured with 100 runs of a ``@db_task`` (``SELECT pg_sleep``) in one
    process, garbage collection CPU (``gc.callbacks``, thread CPU time) over
    a 5,000-task drain: 1.44-1.61 s untuned, 0.77-1.04 s with the freeze
    alone, 0.23-0.31 s with both (~230 µs less CPU per task); a full
    collection took 80-120 ms every ~4 s untuned, 7-20 ms after the freeze.
    """
    global _tuned_in
    if _tuned_in == os.getpid():
        return
    _tuned_in = os.getpid()
    gc.collect()
    gc.freeze()
    young, *older = gc.get_threshold()
    if young and young < YOUNG_GENERATION_THRESHOLD:
        gc.set_threshold(YOUNG_GENERATION_THRESHOLD, *older)


def _cancel_and_wait(jobs: list[_Job], done: threading.Event) -> None:
    """On the loop: cancel the jobs' tasks, set ``done`` once they ended (or the grace ran out)."""
    tasks = [job.task for job in jobs if job.task is not None and not job.task.done()]
    for task in tasks:
        task.cancel()
    if not tasks:
        done.set()
        return
    waiter = asyncio.ensure_future(asyncio.wait(tasks, timeout=_CANCEL_GRACE_SECONDS))
    waiter.add_done_callback(lambda _: done.set())


def _call(callback: Callable[..., Any], args: tuple[Any, ...]) -> None:
    try:
        callback(*args)
    except Exception:  # noqa: BLE001 - as Celery's pools do: log, go on with the others
        _log.exception("Pool callback %r raised", callback)
