"""kombu's Redis transport, made to survive a broker restart under a running worker.

Two faults of kombu 5.7's Redis transport show when the server goes away
while a Celery worker consumes (Celery's ``on_connection_error_after_connected``
runs ``connection.collect()`` and then ``connection.close()``):

1. **The worker dies.** ``Channel.close()`` first reads the reply of the
   ``BRPOP`` in flight; with the server gone that raises before the channel is
   marked closed. ``collect()`` then clears the transport's ``client``, and the
   second ``close()`` (or a late ``ack``) builds a connection pool from
   ``client.hostname``: ``AttributeError``, which neither kombu nor Celery
   treats as a connection error, so the worker exits ("Unrecoverable error").
   Here a channel whose connection is gone raises ``ConnectionError`` instead,
   and ``close()`` finishes even when the pending ``BRPOP`` cannot be read.
2. **Work waits an hour.** On close kombu puts the channel's unacknowledged
   messages back in their queues, and an ``ack`` removes a message from the
   ``unacked`` hash; with the server down both fail, so the messages stay in
   the hash until ``visibility_timeout`` (an hour by default) has passed, and
   a task that finished during the outage runs a second time then. Here what
   could not be told to the server is kept and told as soon as a new channel
   of this process connects: the messages go back to their queues, the
   finished ones are acknowledged. On Redis an acknowledgement or a restore
   is a change of the ``unacked`` hash keyed by the delivery tag, so it does
   not need the channel that received the message.

Everything else is kombu's. Selected for ``redis://`` and ``rediss://`` brokers
by ``build_celery_config`` (``broker_transport``), so the URL keeps its format.
No library offers this; a transport subclass is kombu's own extension point.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from kombu.transport import redis as _kombu_redis
from kombu.transport import virtual as _kombu_virtual
from redis.exceptions import ConnectionError as RedisConnectionError

# kombu's transports are untyped (celery-types stubs only part of them).
kombu_redis: Any = _kombu_redis
virtual: Any = _kombu_virtual

_log = logging.getLogger("app.core.background.broker")

# Delivery tags kept for the next connection, at most this many of each kind
# (a worker holds a few messages at a time; the cap only bounds a pathology).
_MAX_KEPT = 10_000


# A message as kombu keeps it in the ``unacked`` hash: payload, exchange, routing key.
RawMessage = tuple[dict[str, Any], str, str]


class LostDeliveries:
    """What this process could not tell the broker: restores and acknowledgements.

    One per process: the worker's main process receives and acknowledges every
    message (prefork children never touch the broker connection).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # tag -> the message itself when it may exist nowhere else (see
        # ``QoS.append``), else None: it is in the ``unacked`` hash.
        self._restores: dict[str, RawMessage | None] = {}
        self._acks: dict[str, None] = {}

    def restore_later(self, tag: str, message: RawMessage | None = None) -> None:
        with self._lock:
            self._acks.pop(tag, None)
            if len(self._restores) < _MAX_KEPT:
                self._restores[tag] = message or self._restores.get(tag)

    def ack_later(self, tag: str) -> None:
        with self._lock:
            if tag not in self._restores and len(self._acks) < _MAX_KEPT:
                self._acks[tag] = None

    def pending(self) -> tuple[int, int]:
        """(messages to restore, acknowledgements to send)."""
        with self._lock:
            return len(self._restores), len(self._acks)

    def replay(self, qos: QoS) -> None:
        """Tell the server through ``qos``'s (new, connected) channel; keep what fails."""
        with self._lock:
            restores, acks = dict(self._restores), list(self._acks)
        if not restores and not acks:
            return
        done_restores, done_acks = [], []
        try:
            for tag, message in restores.items():
                qos.restore(tag, message)
                done_restores.append(tag)
            for tag in acks:
                qos.remove_from_indices(tag)
                done_acks.append(tag)
        except qos.channel.connection_errors as exc:
            _log.warning(
                "Broker still unreachable; lost deliveries kept for the next connection",
                extra={"fields": {"error": repr(exc)}},
            )
        finally:
            with self._lock:
                for tag in done_restores:
                    self._restores.pop(tag, None)
                for tag in done_acks:
                    self._acks.pop(tag, None)
        if done_restores or done_acks:
            _log.warning(
                "Messages of the lost broker connection settled",
                extra={"fields": {"restored": len(done_restores), "acknowledged": len(done_acks)}},
            )

    def clear(self) -> None:
        with self._lock:
            self._restores.clear()
            self._acks.clear()


lost_deliveries = LostDeliveries()


class QoS(kombu_redis.QoS):  # type: ignore[misc]
    """Keeps, for the next connection, the restores and acks the server did not get."""

    channel: Channel
    _delivered: dict[str, Any]

    def append(self, message: Any, delivery_tag: str) -> None:
        try:
            super().append(message, delivery_tag)
        except self.channel.connection_errors:
            # BRPOP took the message off its queue, then writing it to the
            # ``unacked`` hash failed: it may now exist only here. Put it back
            # on the next connection; the consumer never sees it now.
            delivery = message.delivery_info
            raw = (message._raw, delivery["exchange"], delivery["routing_key"])
            lost_deliveries.restore_later(delivery_tag, raw)
            raise

    def ack(self, delivery_tag: str) -> None:
        try:
            super().ack(delivery_tag)
        except self.channel.connection_errors as exc:
            self._keep(delivery_tag, exc, restore=False)

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        try:
            super().reject(delivery_tag, requeue=requeue)
        except self.channel.connection_errors as exc:
            self._keep(delivery_tag, exc, restore=requeue)

    def _keep(self, delivery_tag: str, exc: BaseException, *, restore: bool) -> None:
        """An ack (or reject) the server did not get: sent again on the next connection."""
        if restore:
            lost_deliveries.restore_later(delivery_tag)
        else:
            lost_deliveries.ack_later(delivery_tag)
        # Forget it here, so that closing the channel does not restore it too.
        virtual.QoS.ack(self, delivery_tag)
        _log.warning(
            "Broker unreachable: the message is settled when the worker reconnects",
            extra={
                "fields": {
                    "delivery_tag": delivery_tag,
                    "action": "restore" if restore else "acknowledge",
                    "error": repr(exc),
                }
            },
        )

    def restore_unacked(self, client: Any = None) -> None:
        tags = list(self._delivered)
        try:
            super().restore_unacked(client)
        except self.channel.connection_errors:
            # The server is gone: restore them on the next connection (a
            # message restored already before the failure is skipped then).
            for tag in tags:
                lost_deliveries.restore_later(tag)
            self._delivered.clear()
            _log.warning(
                "Broker unreachable: unacknowledged messages go back to their queues "
                "when the worker reconnects",
                extra={"fields": {"messages": len(tags)}},
            )

    def restore(self, tag: str, message: RawMessage | None) -> None:
        """Put a message back on its queue and out of the ``unacked`` hash, atomically.

        Without ``message``, as read from the hash (nothing happens if it is
        no longer there: restored by the visibility sweep, or acknowledged).
        """
        if message is None:
            self.restore_by_tag(tag)
            return
        payload, exchange, routing_key = message

        def requeue(pipe: Any) -> None:
            pipe.multi()
            self._remove_from_indices(tag, pipe)
            self.channel._do_restore_message(payload, exchange, routing_key, pipe)

        with self.channel.conn_or_acquire() as client:
            client.transaction(requeue, self.unacked_key)

    def remove_from_indices(self, delivery_tag: str) -> None:
        self._remove_from_indices(delivery_tag).execute()


class Channel(kombu_redis.Channel):  # type: ignore[misc]
    QoS = QoS

    connection: Any
    connection_errors: tuple[type[BaseException], ...]
    _in_poll: Any

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # connects (PING)
        lost_deliveries.replay(self.qos)

    def close(self) -> None:
        if self._in_poll:
            try:
                self._brpop_read()
            except (kombu_redis.Empty, *self.connection_errors):
                pass  # the BRPOP's reply is lost with the connection
        super().close()

    def _connparams(self, asynchronous: bool = False) -> Any:
        if self.connection is None or self.connection.client is None:
            raise RedisConnectionError("this broker channel's connection is closed")
        return super()._connparams(asynchronous=asynchronous)


class Transport(kombu_redis.Transport):  # type: ignore[misc]
    Channel = Channel
