"""kombu's Redis transport, made to lose nothing and keep running when the broker restarts.

kombu 5.7's Redis transport has three faults that show when the server goes
away under a consuming Celery worker (Celery's
``on_connection_error_after_connected`` runs ``connection.collect()`` and
then ``connection.close()``):

1. **The worker dies.** ``Channel.close()`` first reads the reply of the
   ``BRPOP`` in flight; with the server gone that raises before the channel is
   marked closed. ``collect()`` then clears the transport's ``client``, and the
   second ``close()`` (or a late ``ack``) builds a connection pool from
   ``client.hostname``: ``AttributeError``, which neither kombu nor Celery
   treats as a connection error, so the worker exits ("Unrecoverable error").
   Here a channel whose connection is gone raises ``ConnectionError``, and
   ``close()`` finishes even when the pending reply cannot be read.
2. **A message is lost.** kombu takes a message with ``BRPOP`` (the server
   removes it from its list as it answers) and only then records it as
   unacknowledged, in a second round trip. A server that stops between the
   two, or a worker killed before it has read the answer (a crash, an OOM
   kill, a host going down while a message arrives), leaves the message
   nowhere: gone for good (measured: about 1 broker restart in 40 under a
   busy queue lost one message; a worker SIGKILLed while its answer waits
   unread loses it every time, tests/reliability/test_redis_faults.py).
   Here a message is only ever taken by a Lua script that takes it *and*
   records it in one atomic step, and remembers which fetch did it; if its
   reply is lost, the worker puts that message back when it reconnects. A
   worker with nothing to take waits with ``BRPOP`` on a *wake list* per
   queue instead of the queue itself: each publish (and each restore) adds a
   token to it after the message, a token wakes one waiting worker, which
   then fetches. A token lost with a worker costs nothing but a wait (another
   worker's ``BRPOP`` times out within ``brpop_timeout``, a second, and
   fetches); so does a message a foreign client (kombu's own transport)
   published without one. The fetch that empties the queues deletes their
   tokens, so a worker that took messages without being woken is not woken
   for them later.
3. **Work waits an hour.** On close kombu puts the channel's unacknowledged
   messages back in their queues, and an ``ack`` removes a message from the
   ``unacked`` hash; with the server down both fail, so the messages stay in
   the hash until ``visibility_timeout`` (an hour by default) has passed, and
   a task that finished during the outage runs a second time then. Here what
   could not be told to the server is kept and told as soon as a new channel
   of this process connects. On Redis an acknowledgement or a restore is a
   change of the ``unacked`` hash keyed by the delivery tag, so it does not
   need the channel that received the message.

The fetch also saves round trips: one script instead of ``BRPOP`` then
``MULTI``/``ZADD``/``HSET``/``EXEC``, and it takes as many messages as the
prefetch has free slots (kombu takes one per round trip: a pool that frees
dozens of slots per turn, threads or the asyncio pool, refills them in one).
The acks of one turn of the worker's loop go in one transaction too, before
the next fetch. Everything else is kombu's. Selected for ``redis://`` and
``rediss://`` brokers by ``build_celery_config`` (``broker_transport``), so
the URL keeps its format.
No library offers this; a transport subclass is kombu's own extension point.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

from kombu.transport import redis as _kombu_redis
from kombu.transport import virtual as _kombu_virtual
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps, loads
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError

# kombu's transports are untyped (celery-types stubs only part of them).
kombu_redis: Any = _kombu_redis
virtual: Any = _kombu_virtual

_log = logging.getLogger("app.core.background.broker")

# Delivery tags kept for the next connection, at most this many of each kind
# (a worker holds a few messages at a time; the cap only bounds a pathology).
_MAX_KEPT = 10_000
# The most messages one fetch takes (bounds the script's time on the server).
_MAX_FETCH = 100
# Tokens a queue's wake list keeps when no worker waits (one per message beyond
# that would only wake workers to find nothing; the fetch that empties the queue
# deletes them anyway).
_MAX_WAKE_TOKENS = 1000

# Take up to ARGV[4] messages, from the first non-empty list on (KEYS[4] to
# KEYS[3 + ARGV[5]], in BRPOP's order), and record each as unacknowledged, as
# kombu's QoS.append would, in the same atomic step. KEYS[1] the unacked hash,
# KEYS[2] its index, KEYS[3] this consumer's fetch marker, the KEYS after the
# lists: the queues' wake lists, deleted when the fetch leaves every list empty
# (their tokens were for messages taken now). ARGV[1] now, ARGV[2] the fetch
# id, ARGV[3] the marker's lifetime in ms. Returns a flat list of
# {list, payload, 1 if recorded} triples, or nil. A message without a
# delivery tag (not kombu's) is not recorded and ends the batch. The payload
# is stored as it came (not re-encoded), so kombu reads back exactly what was
# published. The marker names every tag taken: a lost reply puts them all back.
_FETCH = """
local taken, tags = {}, {}
local limit = tonumber(ARGV[4])
local last_list = 3 + tonumber(ARGV[5])
for i = 4, last_list do
  while #taken < 3 * limit do
    local payload = redis.call('RPOP', KEYS[i])
    if not payload then break end
    local ok, message = pcall(cjson.decode, payload)
    local props = ok and type(message) == 'table' and message['properties']
    local tag = type(props) == 'table' and props['delivery_tag']
    if type(tag) ~= 'string' then
      taken[#taken + 1] = KEYS[i]; taken[#taken + 1] = payload; taken[#taken + 1] = 0
      limit = 0
      break
    end
    local info = props['delivery_info']
    if type(info) ~= 'table' then info = {} end
    local exchange = info['exchange'] or ''
    local routing_key = info['routing_key'] or ''
    redis.call('ZADD', KEYS[2], ARGV[1], tag)
    redis.call('HSET', KEYS[1], tag,
      '[' .. payload .. ',' .. cjson.encode(exchange) .. ',' .. cjson.encode(routing_key) .. ']')
    tags[#tags + 1] = tag
    taken[#taken + 1] = KEYS[i]; taken[#taken + 1] = payload; taken[#taken + 1] = 1
  end
  if #taken >= 3 * limit then break end
end
local emptied = true
for i = 4, last_list do
  if redis.call('LLEN', KEYS[i]) > 0 then emptied = false; break end
end
if emptied then
  for i = last_list + 1, #KEYS do redis.call('DEL', KEYS[i]) end
end
if #tags > 0 then
  redis.call('SET', KEYS[3], ARGV[2] .. ' ' .. table.concat(tags, ' '), 'PX', ARGV[3])
end
if #taken == 0 then return false end
return taken
"""
_FETCH_SHA = hashlib.sha1(_FETCH.encode()).hexdigest()

# A publish: the message (KEYS[1], a queue's list), then a token on the queue's
# wake list (KEYS[2]), kept to ARGV[2] tokens.
_PUBLISH = """
redis.call('LPUSH', KEYS[1], ARGV[1])
redis.call('LPUSH', KEYS[2], 1)
redis.call('LTRIM', KEYS[2], 0, tonumber(ARGV[2]) - 1)
return 1
"""

# Tags the fetch script recorded as unacknowledged: QoS.append skips its own write.
_recorded_by_fetch: set[str] = set()

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
        # fetch marker key -> id of the fetch whose reply was lost.
        self._fetches: dict[str, str] = {}

    def restore_later(self, tag: str, message: RawMessage | None = None) -> None:
        with self._lock:
            self._acks.pop(tag, None)
            if len(self._restores) < _MAX_KEPT:
                self._restores[tag] = message or self._restores.get(tag)

    def ack_later(self, tag: str) -> None:
        with self._lock:
            if tag not in self._restores and len(self._acks) < _MAX_KEPT:
                self._acks[tag] = None

    def fetch_lost(self, marker: str, fetch_id: str) -> None:
        """A fetch's reply was lost: the message it took (if it ran) goes back."""
        with self._lock:
            self._fetches[marker] = fetch_id

    def pending(self) -> tuple[int, int, int]:
        """(messages to restore, acknowledgements to send, fetches to check)."""
        with self._lock:
            return len(self._restores), len(self._acks), len(self._fetches)

    def replay(self, qos: QoS) -> None:
        """Tell the server through ``qos``'s (new, connected) channel; keep what fails."""
        with self._lock:
            restores, acks, fetches = dict(self._restores), list(self._acks), dict(self._fetches)
        if not (restores or acks or fetches):
            return
        restored = acknowledged = 0
        try:
            for marker, fetch_id in fetches.items():
                for tag in qos.taken_by(marker, fetch_id):
                    restores.setdefault(tag, None)
                with self._lock:
                    self._fetches.pop(marker, None)
            for tag, message in restores.items():
                qos.restore(tag, message)
                restored += 1
                with self._lock:
                    self._restores.pop(tag, None)
            for tag in acks:
                qos.remove_from_indices(tag)
                acknowledged += 1
                with self._lock:
                    self._acks.pop(tag, None)
        except qos.channel.connection_errors as exc:
            # Fetches already checked became restores: keep those too.
            for tag, message in restores.items():
                self.restore_later(tag, message)
            _log.warning(
                "Broker still unreachable; lost deliveries kept for the next connection",
                extra={"fields": {"error": repr(exc)}},
            )
        if restored or acknowledged:
            _log.warning(
                "Messages of the lost broker connection settled",
                extra={"fields": {"restored": restored, "acknowledged": acknowledged}},
            )

    def clear(self) -> None:
        with self._lock:
            self._restores.clear()
            self._acks.clear()
            self._fetches.clear()


lost_deliveries = LostDeliveries()


class QoS(kombu_redis.QoS):  # type: ignore[misc]
    """Keeps, for the next connection, the restores and acks the server did not get."""

    channel: Channel
    _delivered: dict[str, Any]

    def append(self, message: Any, delivery_tag: str) -> None:
        if delivery_tag in _recorded_by_fetch:
            # The fetch script recorded it already, atomically with taking it.
            _recorded_by_fetch.discard(delivery_tag)
            virtual.QoS.append(self, message, delivery_tag)
            return
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

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Acks of this turn of the worker's loop, sent together at its end (flush_acks).
        self._pending_acks: list[str] = []

    def can_consume(self) -> bool:
        # kombu asks before each fetch: the acks of this turn free their slots first.
        self.flush_acks()
        return bool(super().can_consume())

    def ack(self, delivery_tag: str) -> None:
        """Acknowledge: at the end of this turn of the worker's loop when called from it, else now.

        An ack is a round trip (ZREM and HDEL in a transaction) that holds the
        consumer's thread; the asyncio pool passes outcomes back by the dozen
        per turn, and one transaction for all of them is one round trip. A
        pending ack is sent before the turn polls again and before the channel
        closes (``restore_unacked``); a process that dies first leaves the
        message unacknowledged, as dying a moment before the ack always has.
        """
        transport = self.channel.connection  # None once the channel is closed
        if transport is not None and transport.acks_batched_here():
            self._pending_acks.append(delivery_tag)
        else:
            self._ack_now([delivery_tag])

    def flush_acks(self) -> None:
        """Send the acks of this turn (``ack``), in one transaction."""
        if self._pending_acks:
            tags, self._pending_acks = self._pending_acks, []
            self._ack_now(tags)

    def _ack_now(self, tags: list[str]) -> None:
        try:
            with self.pipe_or_acquire() as pipe:
                for tag in tags:
                    self._remove_from_indices(tag, pipe)
                pipe.execute()
        except self.channel.connection_errors as exc:
            for tag in tags:
                self._keep(tag, exc, restore=False)
            return
        for tag in tags:
            virtual.QoS.ack(self, tag)

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
        # Acked already: not to be restored (a failed flush keeps them for later).
        self.flush_acks()
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

    def taken_by(self, marker: str, fetch_id: str) -> list[str]:
        """The tags of the messages fetch ``fetch_id`` took (none if that fetch did not run)."""
        with self.channel.conn_or_acquire() as client:
            value = client.get(marker)
            if value is None:
                return []
            recorded_id, *tags = bytes_to_str(value).split(" ")
            client.delete(marker)
        return tags if recorded_id == fetch_id else []

    def remove_from_indices(self, delivery_tag: str) -> None:
        self._remove_from_indices(delivery_tag).execute()


_QoS = QoS


class Channel(kombu_redis.Channel):  # type: ignore[misc]
    QoS = _QoS

    connection: Any
    connection_errors: tuple[type[BaseException], ...]
    _in_poll: Any
    _qos: _QoS | None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Set before kombu's __init__, which already consumes and polls.
        self._command_client: Any = None
        self._active_queues_cache: list[str] | None = None
        super().__init__(*args, **kwargs)  # connects (PING)
        # The id of the fetch in flight (None: a BRPOP, or nothing, is in flight).
        self._fetching: str | None = None
        # A BRPOP on the wake lists is in flight (its answer is a token, not a message).
        self._waiting = False
        self._publish_script: Any = None
        self._fetch_loaded = True  # the script is in the server's cache (else EVAL)
        # kombu prefixes a fixed set of commands' keys; not our script's.
        self._atomic_fetch = not self.global_keyprefix
        lost_deliveries.replay(self.qos)

    # -- per-message costs ------------------------------------------------
    # kombu builds a new client object for every acknowledgement and
    # recomputes the consumed queues on every turn of the worker's loop (up to
    # a tenth of a worker's CPU per task in the asyncio pool's profile, where
    # acks and polls come by the hundred per second). Same commands, computed once.

    @contextlib.contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        """A client for one-off commands (acks, restores): one per channel, not one per call.

        A ``redis.Redis`` object takes a connection from the channel's pool for
        each command, so one object is safe for every thread of the process.
        """
        if client:
            yield client
            return
        if self.connection is None or self.connection.client is None:
            # Closed: kept for the next connection by the caller, as ``_connparams`` says.
            raise RedisConnectionError("this broker channel's connection is closed")
        if self._command_client is None:
            self._command_client = self._create_client()
        yield self._command_client

    @property
    def active_queues(self) -> list[str]:
        """kombu's queues consumed with BRPOP, kept until a consumer is added or cancelled."""
        if self._active_queues_cache is None:
            self._active_queues_cache = super().active_queues
        return self._active_queues_cache

    def basic_consume(self, queue: str, *args: Any, **kwargs: Any) -> Any:
        # kombu reads ``active_queues`` inside (to update its queue cycle).
        self._active_queues_cache = None
        try:
            return super().basic_consume(queue, *args, **kwargs)
        finally:
            self._active_queues_cache = None

    def basic_cancel(self, consumer_tag: str) -> Any:
        # kombu reads ``active_queues`` inside (to update its queue cycle).
        self._active_queues_cache = None
        try:
            return super().basic_cancel(consumer_tag)
        finally:
            self._active_queues_cache = None

    # -- consuming --------------------------------------------------------

    def _brpop_start(self, timeout: float | None = None) -> None:
        """Take queued messages atomically (with none queued, ``_wait`` follows)."""
        if not self._atomic_fetch:
            super()._brpop_start(timeout)
            return
        queues = self._queue_cycle.consume(len(self.active_queues))
        if not queues:
            return
        keys = [self._q_for_pri(queue, pri) for pri in self.priority_steps for queue in queues]
        wake_keys = [_wake_key(queue) for queue in queues]
        # A wait abandoned with its connection (kombu's BRPOP health check) is over:
        # the answer read next is this fetch's, not a token.
        self._waiting = False
        self._fetching = uuid.uuid4().hex
        self._in_poll = self.client.connection
        self._brpop_sent_at = time.monotonic()
        marker = _fetch_marker(self)
        ttl_ms = int(float(self.visibility_timeout) * 1000)
        command, script = ("EVALSHA", _FETCH_SHA) if self._fetch_loaded else ("EVAL", _FETCH)
        self.client.connection.send_command(
            command, script, 3 + len(keys) + len(wake_keys), self.unacked_key,
            self.unacked_index_key, marker, *keys, *wake_keys,
            repr(time.time()), self._fetching, ttl_ms, self._fetch_size(), len(keys),
        )  # fmt: skip

    def _wait(self) -> None:
        """Nothing queued: wait for a token on the queues' wake lists (never for a message).

        A ``BRPOP`` on the queues themselves would take the next message off
        its queue as the server answers, with nothing recording it until this
        process has read the answer: lost if it dies first.
        """
        queues = self._queue_cycle.consume(len(self.active_queues))
        if not queues:
            return
        self._waiting = True
        self._in_poll = self.client.connection
        self._brpop_sent_at = time.monotonic()
        self.client.connection.send_command(
            "BRPOP", *(_wake_key(queue) for queue in queues), self.brpop_timeout or 0
        )

    def _fetch_size(self) -> int:
        """As many messages as the prefetch allows now (kombu fetches one per round trip).

        A pool that runs many tasks at once (threads, the asyncio pool) frees
        many slots per turn of the loop; one round trip refills them all. With
        prefork's one task per process this is one.
        """
        return min(max(self.qos.can_consume_max_estimate() or 1, 1), _MAX_FETCH)

    def _brpop_read(self, **options: Any) -> bool:
        if self._waiting:
            self._read_wake(**options)
            # Woken by a publish, or the wait timed out (a message published
            # without a token is taken then): fetch.
            self._brpop_start()
            raise kombu_redis.Empty()
        fetch_id, self._fetching = self._fetching, None
        if fetch_id is None:
            return bool(super()._brpop_read(**options))
        connection = self.client.connection
        try:
            reply = self.client.parse_response(connection, "EVALSHA", **options)
        except NoScriptError:
            # A restarted (or flushed) server forgot the script: send it whole.
            self._in_poll = None
            self._fetch_loaded = False
            self._brpop_start()
            raise kombu_redis.Empty() from None
        except self.connection_errors:
            self._in_poll = None
            lost_deliveries.fetch_lost(_fetch_marker(self), fetch_id)
            connection.disconnect()
            raise
        self._in_poll = None
        self._fetch_loaded = True
        if not reply:
            self._wait()
            raise kombu_redis.Empty()
        taken = [reply[i : i + 3] for i in range(0, len(reply), 3)]
        self._queue_cycle.rotate(bytes_to_str(taken[-1][0]).rsplit(self.sep, 1)[0])
        for index, (dest, payload, recorded) in enumerate(taken):
            try:
                message = loads(bytes_to_str(payload))
                if int(recorded):
                    _recorded_by_fetch.add(message["properties"]["delivery_tag"])
                self.connection._deliver(message, bytes_to_str(dest).rsplit(self.sep, 1)[0])
            except BaseException:
                # Taken and recorded for this consumer, never delivered: back to their queues.
                self._put_back(taken[index + 1 :])
                raise
        return True

    def _read_wake(self, **options: Any) -> None:
        """Read the answer of the wait on the wake lists (a token, or none: timed out)."""
        self._waiting = False
        connection = self.client.connection
        try:
            self.client.parse_response(connection, "BRPOP", **options)
        except self.connection_errors:
            connection.disconnect()
            raise
        finally:
            self._in_poll = None

    def _put_back(self, taken: list[Any]) -> None:
        for _dest, payload, recorded in taken:
            if int(recorded):
                self.qos.restore_by_tag(loads(bytes_to_str(payload))["properties"]["delivery_tag"])

    # -- publishing: a wake token after each message ----------------------------

    def _put(self, queue: str, message: Any, **kwargs: Any) -> None:
        """kombu's publish (one LPUSH), then a token on the queue's wake list."""
        if not self._atomic_fetch:
            super()._put(queue, message, **kwargs)
            return
        batch = kwargs.get("_publish_batch")
        if batch is None and not (self._expires and queue in self._expires):
            # The common case in one script, one round trip as kombu's single LPUSH.
            key = self._q_for_pri(queue, self._get_message_priority(message, reverse=False))
            with self.conn_or_acquire() as client:
                script = self._publish_script
                if script is None or script.registered_client is not client:
                    script = self._publish_script = client.register_script(_PUBLISH)
                script(keys=[key, _wake_key(queue)], args=[dumps(message), _MAX_WAKE_TOKENS])
            return
        # kombu's own commands (a publish batch's, or a queue's expiry), then the token.
        super()._put(queue, message, **kwargs)
        if batch is not None:
            for name, *args in _token_commands(queue):
                batch.add(name, *args)
            return
        with self.conn_or_acquire() as client:
            _push_token(client.pipeline(transaction=False), queue).execute()

    def _do_restore_message(
        self, payload: Any, exchange: str, routing_key: str, pipe: Any, leftmost: bool = False
    ) -> None:
        """A message back on its queues (a restore, a requeue): a token for each, after it."""
        super()._do_restore_message(payload, exchange, routing_key, pipe, leftmost)
        if self._atomic_fetch:
            for queue in self._lookup(exchange, routing_key):
                _push_token(pipe, queue)

    # -- surviving a lost connection -----------------------------------------

    def close(self) -> None:
        # Acks of the current turn first (kept for the next connection if they fail).
        if self._qos is not None:
            self._qos.flush_acks()
        if self._in_poll:
            try:
                if self._waiting:
                    self._read_wake()  # a token: no fetch now, the channel closes
                else:
                    self._brpop_read()
            except (kombu_redis.Empty, *self.connection_errors):
                pass  # the reply is lost with the connection (a lost fetch is kept)
        super().close()

    def _connparams(self, asynchronous: bool = False) -> Any:
        if self.connection is None or self.connection.client is None:
            raise RedisConnectionError("this broker channel's connection is closed")
        return super()._connparams(asynchronous=asynchronous)


def _wake_key(queue: str) -> str:
    """The list whose tokens say that ``queue`` has a message (``Channel._wait``)."""
    return f"_background.wake.{queue}"


def _token_commands(queue: str) -> list[tuple[Any, ...]]:
    """A token on ``queue``'s wake list, the list kept to ``_MAX_WAKE_TOKENS``."""
    wake = _wake_key(queue)
    return [("lpush", wake, 1), ("ltrim", wake, 0, _MAX_WAKE_TOKENS - 1)]


def _push_token(commands: Any, queue: str) -> Any:
    """``_token_commands`` on a client or pipeline (returned, to execute a pipeline)."""
    for name, *args in _token_commands(queue):
        getattr(commands, name)(*args)
    return commands


def _fetch_marker(channel: Channel) -> str:
    """The key in which this process's fetches note what they took (one fetch at a time)."""
    return f"{channel.unacked_key}_fetch:{_PROCESS_TOKEN[os.getpid()]}"


class _ProcessToken(dict[int, str]):
    """A random token per process id, so that a forked process gets its own."""

    def __missing__(self, pid: int) -> str:
        token = self[pid] = uuid.uuid4().hex
        return token


_PROCESS_TOKEN = _ProcessToken()


class Transport(kombu_redis.Transport):  # type: ignore[misc]
    Channel = Channel

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # The thread running the worker's loop (kombu's hub), once registered.
        self._loop_thread: int | None = None

    def register_with_event_loop(self, connection: Any, loop: Any) -> None:
        super().register_with_event_loop(connection, loop)
        self._loop_thread = threading.get_ident()
        # Before each poll: the acks of the turn (QoS.ack), one transaction per channel.
        loop.on_tick.add(self._flush_acks)

    def acks_batched_here(self) -> bool:
        """Whether an ack from this thread waits for the end of the loop's turn."""
        return self._loop_thread == threading.get_ident()

    def _flush_acks(self) -> None:
        for channel in self.channels:
            channel.qos.flush_acks()
