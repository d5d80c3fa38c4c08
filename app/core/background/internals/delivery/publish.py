"""Bounded, honest publishing: a dispatch is sent, or it fails in bounded time with a typed error.

Celery's defaults let a failed dispatch stall a request or look like a success:

- a broker that accepts connections and never answers: kombu's Redis transport
  has no socket timeout by default, so ``.delay()`` waits forever;
- a result backend that is down: the Redis backend's SUBSCRIBE (so that
  ``.get()`` hears the result) reconnects 20 times over 19 s, then raises a
  ``RuntimeError`` that names neither the task nor the server;
- the ``SENT`` record (``status.py``) is written before the publish, and stays
  when the publish fails: the status API says "pending" for a day.

So every dispatch of the framework runs inside ``bounded_dispatch``. It sets a
deadline (``BACKGROUND_DISPATCH_TIMEOUT``) that the retries respect: kombu's
publish retries call ``deadline.stop_after_deadline`` (their errback, from
``task_publish_retry_policy``), and the result backend's reconnects ask
``deadline.past_deadline`` (``result_backend.py``); the sockets have the same timeout
(``celery_app.build_celery_config``). When the broker did not take the message
in time, the ``SENT`` record goes and ``TaskDispatchError`` names the task, its
id and the servers (passwords masked).

``BoundedAMQP`` puts the same deadline on every publish that does not run
inside ``bounded_dispatch`` (Celery's own: canvas callbacks, retries sent by
a worker), so that ``max_retries=None`` in the retry policy can never mean
"retry forever". Written by hand: kombu and Celery offer per-attempt
timeouts only, no deadline over a whole dispatch.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from celery import Celery
from celery.app.amqp import AMQP
from kombu.exceptions import EncodeError, KombuError
from kombu.utils.json import dumps
from redis.exceptions import RedisError

from ..exceptions import TaskArgumentError, TaskDispatchError
from ..logging import mask_url_passwords
from ..operations.status import forget_unsent
from ..transport.deadline import deadline_in

DEFAULT_DISPATCH_TIMEOUT = 5.0

# What a broker or result backend that is down or silent raises on the way out:
# kombu's OperationalError (its connection errors, re-raised as library
# errors), redis-py's errors, socket errors and timeouts, and the RuntimeError
# Celery's result consumer raises when it gives up reconnecting.
_UNREACHABLE = (KombuError, RedisError, OSError, RuntimeError)


def check_dispatch(task: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> str:
    """Check the arguments as ``apply_async`` would; the JSON the broker would carry.

    For the dispatches that send later (after commit, outbox): a bad call fails
    in the caller, before anything is committed.
    """
    task.check_arguments(args, kwargs)
    try:
        return dumps([list(args), dict(kwargs)])
    except TypeError as exc:
        raise TaskArgumentError(f"{task.name}: arguments must be JSON-serializable: {exc}") from exc


def dispatch_timeout(app: Celery) -> float:
    return float(app.conf.get("background_dispatch_timeout") or DEFAULT_DISPATCH_TIMEOUT)


@contextmanager
def bounded_dispatch(
    app: Celery, task_name: str, unconfirmed: Sequence[str] = ()
) -> Iterator[None]:
    """Run one dispatch (or one bulk send) within the dispatch timeout.

    ``unconfirmed``: the ids whose messages are not known to have reached the
    broker; a bulk sender empties it as its chunks go out. On failure their
    ``SENT`` records are removed and ``TaskDispatchError`` is raised.
    """
    with deadline_in(dispatch_timeout(app)) as owner:
        if not owner:
            # The outer dispatch reports the failure (apply_async around send_task).
            yield
            return
        started = time.monotonic()
        try:
            yield
        except (TaskArgumentError, EncodeError, TaskDispatchError):
            raise
        except _UNREACHABLE as exc:
            forget_unsent(app, list(unconfirmed))
            raise TaskDispatchError(
                _explain(app, task_name, list(unconfirmed), exc, time.monotonic() - started),
                task_name=task_name,
                task_ids=tuple(unconfirmed),
            ) from exc


def _explain(
    app: Celery, task_name: str, task_ids: list[str], exc: BaseException, waited: float
) -> str:
    which = task_ids[0] if len(task_ids) == 1 else f"{len(task_ids)} tasks"
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
