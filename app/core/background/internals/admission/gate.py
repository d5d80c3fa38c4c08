"""The gate a run of a limited task passes before its body, and what happens when it may not.

``runner.execute`` calls ``admission.enter`` after checking the message and
before the hooks and the body. For a task with limits (``limits.py``) it takes
a concurrency slot, then a rate token, from the shared store
(``stores.py``), keyed by the run's arguments. Both granted: the run goes on,
holding a ``Ticket`` that gives the slot back when the run ends, whatever the
outcome. Refused: ``enter`` raises ``MustWait`` and the run is deferred
(``defer``):

1. the result backend gets the state ``WAITING`` (the status API:
   ``waiting``, with the limit, the key and when it comes back);
2. the same message (same id, arguments, attempt, headers) is sent again with
   a countdown of the store's wait, plus a count of its deferrals. It is not
   a retry: the retry policy and the attempt count do not move;
3. ``TaskDeferred`` (Celery's ``Ignore``) ends this delivery, acknowledged.

So a waiting task holds no worker slot and does not spin: it comes back when
the store expects capacity for it. While a slot is held, ``SlotKeeper``
renews its lease every third of it; a process that dies stops renewing and
its slots are free again within one lease (``BACKGROUND_ADMISSION_LEASE_SECONDS``).
A delivery of the same task again (its process died before acknowledging)
takes its own slot back at once.

A slot given back waits in the keeper for up to ``GIVE_BACK_LINGER``: the
process's next capped run takes it with its own take (one call to the store
for both, ``AdmissionStore.take_slot(release=...)``), else the keeper's
thread sends it alone. So a process that runs capped tasks one after another
makes one round trip per run, and nobody wakes a thread per run.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import TYPE_CHECKING, Any

from celery import states
from celery.exceptions import Ignore, Reject

from ..context import TaskContext
from ..event_loop import worker_loop
from ..exceptions import TaskConfigurationError, TaskDeferred
from ..logging import FRAMEWORK_LOGGER_NAME
from ..operations.cancel import revoked_in_backend
from ..operations.status import WAITING
from ..registry import DEFERRALS_HEADER
from .limits import Limits, call_arguments
from .stores import AdmissionStore, GivenBack

if TYPE_CHECKING:
    from ..base import BaseTask

_log = logging.getLogger(FRAMEWORK_LOGGER_NAME)

# The longest a deferred task waits before asking again. Far below Redis's
# visibility timeout (a countdown message is held unacknowledged meanwhile).
MAX_WAIT_SECONDS = 300.0
DEFAULT_LEASE_SECONDS = 30.0
# How long a slot given back waits for the process's next capped run to carry its
# return (one round trip for the return and the next take, instead of one each)
# before the keeper's thread sends it alone. Longer than the gap between two runs
# of a busy process (a message from the pool's queue: well under a millisecond to
# a few), so nearly every return of a busy process is carried; short against any
# run worth capping and any lease, so the slot's late return costs its waiters
# nothing they would notice. It is also how often the keeper's thread looks while
# slots are given back: it is not woken per run.
GIVE_BACK_LINGER = 0.01
# How long the consumer takes a scope it found free as free (``Admission.screen``).
SCREEN_PAUSE = 0.1


class MustWait(Exception):
    """The run may not start now: ``limit`` (``"concurrency"``/``"rate_limit"``) of ``key``."""

    def __init__(self, limit: str, key: str, wait: float) -> None:
        super().__init__(f"waiting for its {limit} (key {key!r}), {wait:.3f}s")
        self.limit, self.key, self.wait = limit, key, wait


@dataclass(slots=True)
class Ticket:
    """What an admitted run holds: its concurrency slot, if its task has a cap."""

    gate: Admission
    slot: tuple[str, str] | None
    started: float

    def release(self, ran: bool = True) -> None:
        """Give the slot back (``ran``: the run's time counts in the waiters' spacing).

        The process's next capped run carries its return, or the keeper's
        thread sends it, off the run's path: the process goes on to its next
        message meanwhile (the slot is then free a moment after the run ends,
        never before, and at most about ``GIVE_BACK_LINGER`` after).
        """
        if self.slot is None:
            return
        slot, self.slot = self.slot, None
        duration = time.monotonic() - self.started if ran else None
        self.gate.keeper.give_back(slot, duration)


class SlotKeeper:
    """The slots of this process's runs, kept in the store from a thread of its own.

    It renews the lease of every slot held, every third of a lease, from the
    moment its run takes it until the run gives it back (``Ticket.release``,
    in the runner's ``finally``). There is no other cut-off: a body that runs
    past its time limit (threads and solo do not enforce one) still holds its
    slot, so the cap is never exceeded.

    A slot given back waits here for ``GIVE_BACK_LINGER``: the process's next
    capped run claims it (``claim``) and its take gives it back in the same
    call to the store. One that nobody claimed in that time goes alone from
    the thread, which looks every ``GIVE_BACK_LINGER`` while slots are given
    back and sleeps until the next renewal once they are not (the first slot
    given back after that wakes it): so a slot is held at most about
    ``GIVE_BACK_LINGER`` past its run's end. What is left when the process
    ends goes with ``flush`` (the worker's shutdown signals); a process killed
    before that leaves its slots to their leases, like a run killed mid-way.
    """

    def __init__(self, gate: Admission) -> None:
        self._gate = gate
        self._held: dict[tuple[str, str], None] = {}
        # Slots given back and not sent yet, with when the thread sends them (in that order).
        self._given_back: list[tuple[GivenBack, float]] = []
        self._lock = threading.Lock()
        # Held while slots go back to the store: ``flush`` waits for the thread's sends.
        self._sending = threading.Lock()
        self._wake = threading.Event()
        # Under ``_lock``: whether a slot was given back since the thread last looked,
        # and whether it sleeps until its next renewal (a slot given back wakes it).
        self._busy = False
        self._asleep = False
        self._pid: int | None = None

    def hold(self, slot: tuple[str, str]) -> None:
        with self._lock:
            self._held[slot] = None
            self._start()

    def drop(self, slot: tuple[str, str]) -> None:
        """Stop renewing ``slot`` without giving it back (its lease ends it)."""
        with self._lock:
            self._held.pop(slot, None)

    def give_back(self, slot: tuple[str, str], duration: float | None) -> None:
        """Stop renewing ``slot``; a take claims its return, or the thread sends it within
        ``GIVE_BACK_LINGER`` (``duration``: as for ``AdmissionStore.release_slot``)."""
        scope, holder = slot
        with self._lock:
            self._held.pop(slot, None)
            self._given_back.append(
                (GivenBack(scope, holder, duration), time.monotonic() + GIVE_BACK_LINGER)
            )
            self._busy = True
            self._start()
            asleep, self._asleep = self._asleep, False
        if asleep:
            self._wake.set()

    def claim(self, scope: str, any_scope: bool) -> GivenBack | None:
        """A slot given back and not sent yet, for a take to return: of ``scope`` if
        there is one, else (``any_scope``) the one given back first. Claimed, the
        keeper no longer sends it: the caller must (or ``reclaim`` it)."""
        with self._lock:
            given_back = self._given_back
            for index, (slot, _) in enumerate(given_back):
                if slot.scope == scope:
                    return given_back.pop(index)[0]
            if any_scope and given_back:
                return given_back.pop(0)[0]
        return None

    def reclaim(self, slot: GivenBack) -> None:
        """Send ``slot`` after all: the take that claimed it failed, maybe before sending it."""
        self.give_back((slot.scope, slot.holder), slot.duration)

    def flush(self, timeout: float = 10.0) -> None:
        """Give back, from the calling thread, every slot not sent yet (the process ends)."""
        if not self._sending.acquire(timeout=timeout):
            return  # the thread is stuck on the store: the leases end those slots
        try:
            self._send_given_back(None)
        finally:
            self._sending.release()

    def _start(self) -> None:
        # Under ``_lock``. A prefork child starts with no thread (threads do not
        # survive a fork): the first slot of each process starts its own.
        if self._pid != os.getpid():
            self._pid = os.getpid()
            threading.Thread(target=self._keep, name="admission-slots", daemon=True).start()

    def _keep(self) -> None:
        pid = os.getpid()
        renew_at = time.monotonic() + self._gate.lease_seconds / 3
        while self._pid == pid:
            self._wake.wait(max(self._next_look(renew_at) - time.monotonic(), 0.0))
            # Cleared before the list is read: a slot given back meanwhile is seen.
            self._wake.clear()
            with self._sending:
                self._send_given_back(time.monotonic())
            if time.monotonic() >= renew_at:
                lease = self._gate.lease_seconds
                renew_at = time.monotonic() + lease / 3
                with self._lock:
                    held = list(self._held)
                try:
                    self._gate.store.renew_slots(held, lease)
                except Exception:  # noqa: BLE001 - tried again next time; the leases may lapse
                    _log.exception("Could not renew the leases of concurrency slots")

    def _next_look(self, renew_at: float) -> float:
        """When the thread looks again: when the first slot waiting is due, a linger on
        while slots are given back, else at the renewal (asleep: a slot given back wakes it)."""
        with self._lock:
            if self._given_back:
                at = min(due for _, due in self._given_back)
            elif self._busy:
                at = time.monotonic() + GIVE_BACK_LINGER
            else:
                at, self._asleep = renew_at, True
            self._busy = False
        return min(at, renew_at)

    def _send_given_back(self, now: float | None) -> None:
        """Send the slots due by ``now`` (None: all of them)."""
        with self._lock:
            due = [slot for slot, at in self._given_back if now is None or at <= now]
            self._given_back = [
                (slot, at) for slot, at in self._given_back if now is not None and at > now
            ]
        for slot in due:
            try:
                self._gate.store.release_slot(slot.scope, slot.holder, slot.duration)
            except Exception:  # noqa: BLE001 - the lease then expires by itself
                _log.exception(
                    "Could not give back a concurrency slot; it is free again when its lease ends",
                    extra={"fields": {"scope": slot.scope}},
                )


class Admission:
    """The process's gate: the store and the lease length come from the settings."""

    def __init__(self) -> None:
        self._factory: Callable[[], AdmissionStore] | None = None
        self._store: AdmissionStore | None = None
        self.lease_seconds = DEFAULT_LEASE_SECONDS
        self.keeper = SlotKeeper(self)
        # Consumer screening (``screen``): scope -> until when it is taken as free;
        # keyed task -> until when its messages pass without a look, and until when
        # they may not (a look found one of its scopes full).
        self._clear_until: dict[str, float] = {}
        self._task_clear_until: dict[str, float] = {}
        self._task_refused_until: dict[str, float] = {}

    def configure(self, store_factory: Callable[[], AdmissionStore], lease_seconds: float) -> None:
        """Say where the limits live (built on first use) and how long a slot's lease is."""
        self._factory, self._store = store_factory, None
        self.lease_seconds = lease_seconds

    def use_store(self, store: AdmissionStore) -> None:
        self._store = store

    @property
    def store(self) -> AdmissionStore:
        if self._store is None:
            if self._factory is None:
                raise TaskConfigurationError(
                    "task limits are not configured: import app.core.background.celery_app"
                )
            self._store = self._factory()
        return self._store

    def enter(
        self,
        task: BaseTask[Any, Any],
        ctx: TaskContext,
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any],
    ) -> Ticket | None:
        """The run's ticket, None for a task without limits, or ``MustWait``."""
        limits = task.limits
        if limits is None:
            return None
        arguments = call_arguments(task.body_signature, args, kwargs) if limits.keyed else {}
        slot = limits.concurrency_scope(arguments)
        rate = limits.rate_scope(arguments)
        ticket = Ticket(self, None, time.monotonic())
        returning = deferrals_of(task.request) > 0
        if slot is not None:
            scope, key = slot
            cap = limits.concurrency
            assert cap is not None
            store = self.store
            # A slot this process gave back a moment ago goes back with this take.
            given_back = self.keeper.claim(scope, store.combines_any_scope)
            try:
                verdict = worker_loop.run_blocking(
                    lambda: store.take_slot(
                        scope,
                        ctx.task_id,
                        cap,
                        self.lease_seconds,
                        MAX_WAIT_SECONDS,
                        returning=returning,
                        release=given_back,
                    )
                )
            except BaseException:
                # The store failed, or a time limit struck, maybe before the return was
                # sent: the keeper sends it (twice at worst: the second deletes nothing,
                # its run's time counts twice in the average).
                if given_back is not None:
                    self.keeper.reclaim(given_back)
                raise
            if not verdict.admitted:
                raise MustWait("concurrency", key, verdict.wait)
            ticket.slot = (scope, ctx.task_id)
            self.keeper.hold(ticket.slot)
        if rate is not None and limits.rate is not None:
            scope, key = rate
            pace = limits.rate
            try:
                verdict = worker_loop.run_blocking(
                    lambda: self.store.take_token(
                        scope, pace, MAX_WAIT_SECONDS, returning=returning
                    )
                )
            except BaseException:
                # The store failed, or a time limit struck: the slot goes back.
                ticket.release(ran=False)
                raise
            if not verdict.admitted:
                ticket.release(ran=False)
                raise MustWait("rate_limit", key, verdict.wait)
        ticket.started = time.monotonic()
        return ticket

    def seems_clear(self, task: BaseTask[Any, Any]) -> bool:
        """Whether ``task``'s next message can pass the consumer without a look.

        Asked before the message is decoded. An unkeyed limit's scopes do not
        depend on the arguments: clear when each was found free within
        ``SCREEN_PAUSE``. A keyed task's scope is known only from a decoded
        message, whose key function runs in the consumer (the worker's busiest
        process): its messages pass unlooked for ``SCREEN_PAUSE`` after a look
        found free room, unless a look found a scope full within that time.
        So under a limit far above the load the consumer decodes a message of
        the task now and then, not each one; a message that must wait and
        passes unlooked costs its run a moment of a pool slot (the run defers
        itself); and once a key floods, every message is looked at again.
        """
        limits = task.limits
        if limits is None:
            return True
        now = time.monotonic()
        if limits.keyed:
            return self._task_clear_until.get(task.name, 0.0) > now
        scopes = (limits.concurrency_scope({}), limits.rate_scope({}))
        return all(scope is None or self._clear_until.get(scope[0], 0.0) > now for scope in scopes)

    def screen(
        self, task: BaseTask[Any, Any], args: tuple[Any, ...], kwargs: Mapping[str, Any]
    ) -> MustWait | None:
        """Whether a fresh message would have to wait, asked without taking anything.

        For the worker's consumer (``consumer.py``). A scope found free is not
        asked again for ``SCREEN_PAUSE``: its messages go straight to the pool,
        whose run takes for real (and defers itself if it must). So a limit far
        above the load costs the consumer one look per scope now and then, and
        a limit that refuses costs it one look per message. Raises
        ``TypeError`` for arguments the body cannot take (the run refuses them).
        """
        limits = task.limits
        if limits is None:
            return None
        now = time.monotonic()
        waiting = self._look(limits, call_arguments(task.body_signature, args, kwargs), now)
        if waiting is not None:
            self._task_clear_until.pop(task.name, None)
            self._task_refused_until[task.name] = now + SCREEN_PAUSE
        elif limits.keyed and self._task_refused_until.get(task.name, 0.0) <= now:
            self._task_clear_until[task.name] = now + SCREEN_PAUSE
        return waiting

    def _look(self, limits: Limits, arguments: Mapping[str, Any], now: float) -> MustWait | None:
        """``screen``'s look at the store, for the scopes not found free within the pause."""
        slot = limits.concurrency_scope(arguments)
        if slot is not None and self._clear_until.get(slot[0], 0.0) <= now:
            scope, key = slot
            cap = limits.concurrency
            assert cap is not None
            verdict = self.store.take_slot(
                scope, "", cap, self.lease_seconds, MAX_WAIT_SECONDS, peek=True
            )
            if not verdict.admitted:
                return MustWait("concurrency", key, verdict.wait)
            self._clear_until[scope] = now + SCREEN_PAUSE
        rate = limits.rate_scope(arguments)
        if (
            rate is not None
            and limits.rate is not None
            and self._clear_until.get(rate[0], 0.0) <= now
        ):
            scope, key = rate
            verdict = self.store.take_token(scope, limits.rate, MAX_WAIT_SECONDS, peek=True)
            if not verdict.admitted:
                return MustWait("rate_limit", key, verdict.wait)
            self._clear_until[scope] = now + SCREEN_PAUSE
        return None


admission = Admission()


def defer(
    task: BaseTask[Any, Any],
    request: Any,
    ctx: TaskContext,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    waiting: MustWait,
) -> BaseException:
    """Send the run again for after its wait; the exception that ends this delivery.

    ``TaskDeferred`` once the copy is sent (``WAITING`` stored, best effort: a
    state is no reason to lose the run). ``Reject(requeue=True)`` when the
    copy could not be sent: this message goes back to its queue, ``PENDING``
    stored so that its next start is not counted as a run lost with its
    process. Plain ``Ignore`` when the task was revoked meanwhile: no copy.
    ``request`` is Celery's context of this delivery (``task.request`` in a
    run; built from the message in the consumer, ``consumer.py``).
    """
    if _revoked(task, ctx):
        ctx.log_info("Task revoked while waiting for its limit: not sent again")
        return Ignore()
    wait = waiting.wait
    if wait >= MAX_WAIT_SECONDS:
        # Beyond the store's horizon every such waiter was told the same: spread them.
        wait *= random.uniform(0.5, 1.0)
    # RabbitMQ's dead-lettering history stays with the message it describes (as
    # Celery's own ``as_execution_options`` does).
    headers = {
        name: value
        for name, value in (getattr(request, "headers", None) or {}).items()
        if name != "x-death"
    }
    deferrals = deferrals_of(request) + 1
    headers[DEFERRALS_HEADER] = deferrals
    if not task.ignore_result:
        until = datetime.now(UTC) + timedelta(seconds=wait)
        meta = {
            "limit": waiting.limit,
            "key": waiting.key,
            "until": until.isoformat(),
            "deferrals": deferrals,
        }
        try:
            task.backend.store_result(ctx.task_id, meta, WAITING, request=request)
        except Exception:  # noqa: BLE001 - the status is not worth the run
            ctx.log_warning("Could not store the WAITING state of a task sent back to wait")
    try:
        # Celery's own way to send a request again (what ``Task.retry`` does), with
        # the attempt count unchanged; the deferral header makes deduplication keep
        # the task's lease instead of refusing its own id (``delivery/dedup.py``).
        task.signature_from_request(
            request, args, kwargs, countdown=wait, retries=request.retries, headers=headers
        ).apply_async()
    except Exception:  # noqa: BLE001 - the message must not be lost with the send
        ctx.log_error(
            "Could not send a waiting task again; it goes back to its queue", exc_info=True
        )
        with contextlib.suppress(Exception):
            task.backend.store_result(ctx.task_id, None, states.PENDING, request=request)
        return Reject(requeue=True)
    return TaskDeferred(str(waiting))


def deferrals_of(request: Any) -> int:
    """How often this delivery's message was sent back to wait (0: it is fresh)."""
    headers = getattr(request, "headers", None) or {}
    return int(headers.get(DEFERRALS_HEADER) or getattr(request, DEFERRALS_HEADER, 0) or 0)


def _revoked(task: BaseTask[Any, Any], ctx: TaskContext) -> bool:
    """Whether a revoke reached the result backend (a copy sent again would outlive it)."""
    try:
        return worker_loop.run_blocking(partial(revoked_in_backend, task.app, ctx.task_id))
    except Exception:  # noqa: BLE001 - unknown: the worker's own revoked list still applies
        return False
