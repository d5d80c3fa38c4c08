"""The one way a task message leaves the process: ``publish``.

Every route ends here: ``.delay()``/``.apply_async()``, a deduplicated send
(``dedup.py`` takes the lease, then publishes), a retry (Celery's
``Task.retry`` calls ``apply_async``), a dispatch after commit
(``after_commit.py``), the outbox relay (``outbox.py``, by task name) and a
bulk send (``bulk.py``, many messages through one producer). ``publish``
checks the arguments, adds the framework's headers, hands each message to
Celery's own send (``Task.apply_async`` or ``Celery.send_task``: routing,
the message format, serialization), bounds the whole dispatch in time, and
counts what was sent and what was not.

Bounded and honest, because Celery's defaults let a failed dispatch stall a
request or look like a success:

- a broker that accepts connections and never answers: kombu's Redis transport
  has no socket timeout by default, so ``.delay()`` waits forever;
- a result backend that is down: the Redis backend's reconnect loop runs 20
  times over 19 s, then raises a ``RuntimeError`` that names neither the task
  nor the server;
- the ``SENT`` record (``operations/status.py``) is written before the
  publish, and stays when the publish fails: the status API says "pending".

So a dispatch runs inside ``bounded_dispatch``: a deadline
(``BACKGROUND_DISPATCH_TIMEOUT``) that kombu's publish retries respect (their
errback, ``transport.deadline.stop_after_deadline``) and the result backend's
reconnects too; the sockets have the same timeout (``celery_app``). When the
broker did not take a message in time, its ``SENT`` record goes and
``TaskDispatchError`` names the task, its id and the servers (passwords
masked). ``BoundedAMQP`` puts the same deadline on the publishes Celery makes
by itself (canvas callbacks), so ``max_retries=None`` in the publish retry
policy never means "retry forever". Written by hand: kombu and Celery offer
per-attempt timeouts only, no deadline over a whole dispatch.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from celery import Celery, Task
from celery.app.amqp import AMQP
from celery.result import AsyncResult
from celery.utils import uuid
from kombu.exceptions import EncodeError, KombuError
from kombu.utils.json import dumps
from redis.exceptions import RedisError

from ..exceptions import TaskArgumentError, TaskDispatchError
from ..logging import HIDDEN_VALUES, mask_url_passwords
from ..monitoring import record_dispatch, record_dispatch_failure
from ..operations.status import buffered_sent_records, forget_unsent
from ..transport.deadline import deadline_in

if TYPE_CHECKING:
    from ..base import BaseTask

DEFAULT_DISPATCH_TIMEOUT = 5.0

# Messages per Redis pipeline in a bulk send: large enough to amortise the
# round trip, small enough to keep the client's buffer and the reply modest.
DEFAULT_BATCH_SIZE = 500  # pragma: no mutate

# What a broker or result backend that is down or silent raises on the way out:
# kombu's OperationalError (its connection errors, re-raised as library
# errors), redis-py's errors, socket errors and timeouts, and the RuntimeError
# Celery's result consumer raises when it gives up reconnecting.
_UNREACHABLE = (KombuError, RedisError, OSError, RuntimeError)


# Nothing changes a message (frozen or not, the same): pragma: no mutate
@dataclass(frozen=True, slots=True)  # pragma: no mutate
class Message:
    """One task message on its way out: which task, its arguments, id and options.

    ``task`` is the task object, or only its name where the sender need not
    import the task (the outbox relay). ``options`` are Celery's
    (``countdown``, ``queue``, ``priority``...); ``headers`` are the
    framework's own (``registry.TOKEN_HEADER``...), added to the message's.
    """

    task: BaseTask[Any, Any] | str
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    task_id: str = field(default_factory=uuid)
    options: Mapping[str, Any] = field(default_factory=dict)
    headers: Mapping[str, Any] = field(default_factory=dict)

    @property
    def task_name(self) -> str:
        return self.task if isinstance(self.task, str) else self.task.name

    @property
    def queue(self) -> str:
        """The queue it goes to: the option, else the task's declared queue."""
        queue = self.options.get("queue")
        name = getattr(queue, "name", queue)  # a kombu Queue or its name
        if name:
            return str(name)
        return "default" if isinstance(self.task, str) else self.task.background_queue

    def celery_options(self) -> dict[str, Any]:
        """``options`` with the framework's headers merged into Celery's ``headers``.

        Without ``producer``: ``publish_many`` sends every message through one.
        """
        options = {name: value for name, value in self.options.items() if name != "producer"}
        if self.headers:
            options["headers"] = {**(options.get("headers") or {}), **self.headers}
        return options


def checked_message(
    task: BaseTask[Any, Any],
    args: Sequence[Any],
    kwargs: Mapping[str, Any] | None,
    options: Mapping[str, Any],
) -> Message:
    """The message of a call, checked now, for a route that publishes it later.

    After commit and through the outbox: a bad call fails in the caller,
    before anything is committed. ``options["task_id"]`` (if any) is its id.
    """
    kwargs = dict(kwargs or {})
    task.check_arguments(tuple(args), kwargs)
    try:
        dumps([list(args), kwargs])
    except TypeError as exc:
        raise TaskArgumentError(f"{task.name}: arguments must be JSON-serializable: {exc}") from exc
    options = dict(options)
    task_id = options.pop("task_id", None)
    return Message(task, tuple(args), kwargs, str(task_id or uuid()), options)


def publish(app: Celery, message: Message) -> AsyncResult[Any]:
    """Send one message (see the module doc); its result, or ``TaskDispatchError``."""
    # A list of one: [0] and [-1] are the same element. pragma: no mutate
    return publish_many(app, [message])[0]  # pragma: no mutate


def publish_many(
    app: Celery,
    messages: Sequence[Message],
    # Every caller names batch_size; "*" or "/" here are the same: pragma: no mutate
    *,  # pragma: no mutate
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> list[AsyncResult[Any]]:
    """Send ``messages`` in order through one producer; their results.

    Every message with a task object is checked first (a bad call sends
    none). Where the transport defers publishes (Redis), each ``batch_size``
    messages go out as one pipeline, after their ``SENT`` records (a worker
    must never find ``SENT`` written after its own state). Arguments that
    cannot be serialized are found while sending: a pipeline that holds one is
    discarded with its ``SENT`` records (earlier pipelines are sent); without
    pipelines the messages before it are sent, as a loop of ``.delay()`` would.
    A broker failure raises ``TaskDispatchError``: its ``task_ids`` are the
    chunk not confirmed, its ``sent`` the results of the messages before it.
    """
    for message in messages:
        if not isinstance(message.task, str):
            message.task.check_arguments(message.args, message.kwargs)
    if not messages:
        return []
    # Every message of one call has the same task, queue and producer: pragma: no mutate
    first = messages[0]  # pragma: no mutate
    results: list[AsyncResult[Any]] = []
    # The ids not known to be sent: the chunk being sent (from before the producer
    # connects). A message published on its own is sent once its publish returns;
    # a pipelined chunk once the pipeline has gone out.
    unconfirmed = [message.task_id for message in messages[:batch_size]]
    hide_arguments = not app.conf.get("background_log_task_arguments")
    # How many of ``results`` the broker is known to have taken.
    confirmed = 0
    try:
        with (
            bounded_dispatch(app, first.task_name, first.queue, unconfirmed),
            app.producer_or_acquire(first.options.get("producer")) as producer,
        ):
            # kombu's producers always have the property; one message gains nothing
            # from a pipeline (same outcome): pragma: no mutate
            batchable = producer.supports_batch_publish  # pragma: no mutate
            deferred = len(messages) > 1 and batchable  # pragma: no mutate
            for start in range(0, len(messages), batch_size):
                chunk = messages[start : start + batch_size]
                unconfirmed[:] = [message.task_id for message in chunk]
                # Exits run inner first: the chunk's SENT records are written,
                # then its messages published.
                with _pipelined(producer, deferred, len(chunk)), _buffered(app, deferred):
                    for message in chunk:
                        results.append(_send(app, producer, message, hide_arguments))
                        if not deferred:
                            unconfirmed.remove(message.task_id)
                            record_dispatch(message.task_name, message.queue)
                            confirmed = len(results)
                if deferred:
                    for message in chunk:
                        record_dispatch(message.task_name, message.queue)
                    unconfirmed.clear()
                    confirmed = len(results)
    except TaskDispatchError as exc:
        # What went out before the failure, in order: the caller's messages[:len(sent)].
        exc.sent = tuple(results[:confirmed])
        raise
    except EncodeError as exc:
        # Celery wrote the SENT record before kombu found it could not encode the message.
        forget_unsent(app, list(unconfirmed))
        raise TaskArgumentError(
            f"{first.task_name}: arguments must be JSON-serializable: {exc}"
        ) from exc
    return results


def _send(app: Celery, producer: Any, message: Message, hide_arguments: bool) -> AsyncResult[Any]:
    options = message.celery_options()
    if hide_arguments:
        # Celery copies a repr of the arguments into every message for display
        # (events, Flower, `celery inspect`): arguments stay out of sight unless
        # BACKGROUND_LOG_TASK_ARGUMENTS opts in, as in the logs; and that repr
        # is a tenth of the cost of a send.
        options.setdefault("argsrepr", HIDDEN_VALUES)
        options.setdefault("kwargsrepr", HIDDEN_VALUES)
    if isinstance(message.task, str):
        return app.send_task(
            message.task, message.args, dict(message.kwargs), task_id=message.task_id,
            producer=producer, **options,
        )  # fmt: skip
    # Celery's own apply_async (not the framework's override, which routes here):
    # the task's defaults, routing, shadow name, links, parent and root ids.
    sent: AsyncResult[Any] = Task.apply_async(
        message.task, message.args, dict(message.kwargs), message.task_id,
        producer=producer, **options,
    )  # fmt: skip
    return sent


def _pipelined(producer: Any, deferred: bool, size: int) -> contextlib.AbstractContextManager[Any]:
    """kombu's publish batch (one Redis pipeline) for a bulk send, else nothing."""
    if not deferred:
        return contextlib.nullcontext()
    # Each message is a few commands in the pipeline (LPUSH, and its SENT SET);
    # the size bounds the buffer (tuning, not behaviour): pragma: no mutate
    max_size = 2 * size + 16  # pragma: no mutate
    batch: contextlib.AbstractContextManager[Any] = producer.batch(max_size=max_size)
    return batch


def _buffered(app: Celery, deferred: bool) -> contextlib.AbstractContextManager[Any]:
    # Where publishes are not deferred (RabbitMQ, one message), neither are SENT records.
    return buffered_sent_records(app) if deferred else contextlib.nullcontext()


# -- the deadline ----------------------------------------------------------------------


def dispatch_timeout(app: Celery) -> float:
    return float(app.conf.get("background_dispatch_timeout") or DEFAULT_DISPATCH_TIMEOUT)


@contextlib.contextmanager
def bounded_dispatch(
    app: Celery, task_name: str, queue: str, unconfirmed: Sequence[str] = ()
) -> Iterator[None]:
    """Run one dispatch (with its lease, or a whole bulk send) within the dispatch timeout.

    ``unconfirmed``: the ids whose messages are not known to have reached the
    broker (a bulk send empties it as its chunks go out). On failure their
    ``SENT`` records are removed, each is counted as raised, and
    ``TaskDispatchError`` is raised. Inside another bounded dispatch it
    only runs the block: the outer one reports.
    """
    with deadline_in(dispatch_timeout(app)) as owner:
        if not owner:
            yield
            return
        started = time.monotonic()
        try:
            yield
        except (TaskArgumentError, EncodeError, TaskDispatchError):
            raise
        except _UNREACHABLE as exc:
            ids = list(unconfirmed)
            forget_unsent(app, ids)
            for _ in ids:
                record_dispatch_failure(task_name, queue, "raised")
            raise TaskDispatchError(
                _explain(app, task_name, ids, exc, time.monotonic() - started),
                task_name=task_name,
                task_ids=tuple(ids),
            ) from exc


def _explain(
    app: Celery, task_name: str, task_ids: list[str], exc: BaseException, waited: float
) -> str:
    which = f"{len(task_ids)} tasks"
    if len(task_ids) == 1:
        # One id: [0] and [-1] are the same. pragma: no mutate
        which = task_ids[0]  # pragma: no mutate
    broker = mask_url_passwords(str(app.conf.broker_url))
    backend = mask_url_passwords(str(app.conf.result_backend))
    return (
        f"{task_name} [{which}] was not sent within {waited:.1f}s "
        f"(BACKGROUND_DISPATCH_TIMEOUT={dispatch_timeout(app):g}): "
        f"{type(exc).__name__}: {' '.join(mask_url_passwords(str(exc)).split()) or 'no message'} "
        f"-- check that the broker ({broker}) and the result backend ({backend}) are running "
        "and reachable from here (CELERY_BROKER_URL, CELERY_RESULT_BACKEND)."
    )


class BoundedAMQP(AMQP):
    """Celery's AMQP helper whose every publish has the dispatch deadline (see above)."""

    def _create_task_sender(self) -> Any:
        send = super()._create_task_sender()  # type: ignore[misc] # untyped in the stubs
        app = self.app

        def send_task_message(*args: Any, **kwargs: Any) -> Any:
            with deadline_in(dispatch_timeout(app)):
                return send(*args, **kwargs)

        return send_task_message
