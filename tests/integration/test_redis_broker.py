"""The framework's Redis transport against a real redis-server that goes away.

Each fault is caused for real (the server is stopped under an open kombu
connection) and each test has a control: the same steps on kombu's own Redis
transport show the fault the framework's transport fixes.
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from kombu import Connection, Exchange, Queue
from kombu.transport import redis as kombu_redis

from app.core.background.celery_app import build_celery_config
from app.core.background.internals.transport import redis_broker
from app.core.config import Settings
from tests.reliability.support import wait_until
from tests.support.redis_server import RedisServer
from tests.support.services import unavailable

pytestmark = pytest.mark.redis

FRAMEWORK = redis_broker.Transport
KOMBU = kombu_redis.Transport


@pytest.fixture
def server() -> Iterator[RedisServer]:
    try:
        redis = RedisServer(durable=True).start()
    except (FileNotFoundError, RuntimeError) as exc:
        unavailable(str(exc))
    try:
        yield redis
    finally:
        redis.close()


@pytest.fixture(autouse=True)
def _no_leftovers() -> Iterator[None]:
    redis_broker.lost_deliveries.clear()
    yield
    redis_broker.lost_deliveries.clear()


def consuming(server: RedisServer, transport: type, queue_name: str) -> tuple[Connection, Any]:
    """A connection that holds one delivered, unacknowledged message and waits in BRPOP.

    Like a Celery worker: a second channel consumes an auto-delete fanout queue
    (the remote-control "pidbox").
    """
    connection = Connection(server.url(), transport=transport)
    queue = Queue(queue_name)
    with connection.Producer() as producer:
        producer.publish({"n": 1}, routing_key=queue_name, declare=[queue])
    received: list[Any] = []
    consumer = connection.Consumer([queue], callbacks=[lambda _body, msg: received.append(msg)])
    consumer.consume()
    broadcast = Queue(f"{queue_name}.pidbox", Exchange(f"{queue_name}.pidbox", type="fanout"),
                      auto_delete=True)  # fmt: skip
    connection.Consumer([broadcast], channel=connection.channel(), callbacks=[]).consume()
    try:
        while True:
            connection.drain_events(timeout=0.2)
    except TimeoutError:
        pass
    assert len(received) == 1
    return connection, received[0]


def lose_server(server: RedisServer, connection: Connection) -> None:
    """The server stops; then Celery's consumer cleans up as on any connection error."""
    server.shutdown()
    connection.collect(socket_timeout=0.1)  # Consumer.on_connection_error_after_connected
    connection.close()


def test_a_connection_closed_after_the_server_died_does_not_crash(server: RedisServer) -> None:
    connection, _message = consuming(server, FRAMEWORK, "q-crash")
    lose_server(server, connection)  # raised AttributeError with kombu's transport


def test_control_kombus_transport_crashes_there(server: RedisServer) -> None:
    connection, _message = consuming(server, KOMBU, "q-crash-control")
    channels = list(connection.transport.channels)
    with pytest.raises(AttributeError, match="hostname"):
        lose_server(server, connection)
    # kombu would try to restore the half-closed channel's message again at
    # interpreter exit, and print the failure: not this test's business.
    for channel in channels:
        channel.qos._on_collect.cancel()


def test_held_messages_go_back_to_their_queue_on_reconnect(server: RedisServer) -> None:
    connection, _message = consuming(server, FRAMEWORK, "q-held")
    lose_server(server, connection)
    assert redis_broker.lost_deliveries.pending()[0] == 1
    server.start()
    client = server.client()
    assert client.hlen("unacked") == 1
    assert client.llen("q-held") == 0
    with Connection(server.url(), transport=FRAMEWORK) as again:
        again.default_channel  # noqa: B018 - a new channel settles what the last one could not
    assert client.llen("q-held") == 1
    assert client.hlen("unacked") == 0
    assert redis_broker.lost_deliveries.pending() == (0, 0, 0)


def test_control_kombu_leaves_them_for_the_visibility_timeout(server: RedisServer) -> None:
    connection, _message = consuming(server, KOMBU, "q-held-control")
    for channel in connection.transport.channels:
        channel.qos._on_collect.cancel()  # no second restore attempt at exit (see above)
    server.shutdown()
    connection.collect(socket_timeout=0.1)
    server.start()
    with Connection(server.url(), transport=KOMBU) as again:
        again.default_channel  # noqa: B018
    client = server.client()
    assert client.llen("q-held-control") == 0
    assert client.hlen("unacked") == 1


def test_an_ack_the_server_missed_is_sent_on_reconnect(server: RedisServer) -> None:
    connection, message = consuming(server, FRAMEWORK, "q-ack")
    server.shutdown()
    message.ack()  # the task finished during the outage: kept, not raised
    assert redis_broker.lost_deliveries.pending()[1] == 1
    connection.collect(socket_timeout=0.1)
    connection.close()
    server.start()
    with Connection(server.url(), transport=FRAMEWORK) as again:
        again.default_channel  # noqa: B018
    client = server.client()
    assert client.hlen("unacked") == 0
    assert client.llen("q-ack") == 0  # acknowledged: not delivered again


def test_the_fetch_records_the_message_as_kombu_does(server: RedisServer) -> None:
    framework, message = consuming(server, FRAMEWORK, "q-fetch")
    stored = json.loads(server.client().hget("unacked", message.delivery_tag))
    kombu_connection, kombu_message = consuming(server, KOMBU, "q-fetch-kombu")
    kombu_stored = json.loads(server.client().hget("unacked", kombu_message.delivery_tag))
    assert stored[0]["body"] == message._raw["body"]
    assert stored[1:] == ["", "q-fetch"]  # exchange and routing key, as kombu keeps them
    assert kombu_stored[1:] == ["", "q-fetch-kombu"]
    assert set(stored[0]) == set(kombu_stored[0])
    message.ack()
    assert not server.client().hexists("unacked", message.delivery_tag)
    framework.close()
    kombu_connection.close()


def test_a_fetch_whose_reply_was_lost_is_put_back(server: RedisServer) -> None:
    with Connection(server.url(), transport=FRAMEWORK) as connection:
        channel = connection.default_channel
        queue = Queue("q-lost-reply")
        with connection.Producer() as producer:
            for n in range(4):
                producer.publish({"n": n}, routing_key="q-lost-reply", declare=[queue])
        # The fetch (of three messages) ran on the server, its reply never
        # arrived: they are off their list, recorded as unacknowledged by
        # nobody who knows them.
        fetch_id, marker = uuid.uuid4().hex, redis_broker._fetch_marker(channel)
        server.client().eval(
            redis_broker._FETCH, 4, "unacked", "unacked_index", marker, "q-lost-reply",
            "1.0", fetch_id, 60_000, 3, 1,
        )  # fmt: skip
        client = server.client()
        assert client.llen("q-lost-reply") == 1
        assert client.hlen("unacked") == 3
        redis_broker.lost_deliveries.fetch_lost(marker, fetch_id)
    with Connection(server.url(), transport=FRAMEWORK) as again:
        again.default_channel  # noqa: B018
    assert client.llen("q-lost-reply") == 4
    assert client.hlen("unacked") == 0


def test_one_fetch_takes_what_the_prefetch_allows_and_each_is_acked(server: RedisServer) -> None:
    """Many free slots (threads, the asyncio pool): one round trip fills them, none beyond."""
    client = server.client()
    client.script_load(redis_broker._FETCH)  # else the first fetch is sent twice (NOSCRIPT)
    with Connection(server.url(), transport=FRAMEWORK) as connection:
        queue = Queue("q-batch")
        with connection.Producer() as producer:
            for n in range(10):
                producer.publish({"n": n}, routing_key="q-batch", declare=[queue])
        received: list[Any] = []
        keep = [lambda _body, message: received.append(message)]
        with connection.Consumer(queue, callbacks=keep) as consumer:
            consumer.qos(prefetch_count=4)
            fetches = _count_fetches(connection.default_channel)
            deadline = time.monotonic() + 10
            while len(received) < 4 and time.monotonic() < deadline:
                with contextlib.suppress(socket.timeout):
                    connection.drain_events(timeout=0.5)
            # Four slots, four messages, in one fetch: the other six wait on the server.
            assert [m.payload["n"] for m in received] == [0, 1, 2, 3]
            assert fetches == [4]
            assert client.llen("q-batch") == 6
            assert client.hlen("unacked") == 4
            for message in received:
                message.ack()
            assert client.hlen("unacked") == 0
            while len(received) < 10 and time.monotonic() < deadline:
                with contextlib.suppress(socket.timeout):
                    connection.drain_events(timeout=0.5)
                for message in received:
                    if not message.acknowledged:
                        message.ack()
            assert [m.payload["n"] for m in received] == list(range(10))
            assert fetches[:3] == [4, 4, 4]  # three round trips for ten messages
            assert client.hlen("unacked") == 0


def _count_fetches(channel: Any) -> list[int]:
    """The size of each fetch ``channel`` sends from now on."""
    sizes: list[int] = []
    fetch_size = channel._fetch_size

    def counted() -> int:
        sizes.append(fetch_size())
        return sizes[-1]

    channel._fetch_size = counted
    return sizes


def test_an_older_fetch_in_the_marker_is_left_alone(server: RedisServer) -> None:
    """The lost fetch never ran: the marker names an earlier fetch, whose message is in use."""
    with Connection(server.url(), transport=FRAMEWORK) as connection:
        marker = redis_broker._fetch_marker(connection.default_channel)
        server.client().set(marker, "earlier-fetch-id some-tag")
        server.client().hset("unacked", "some-tag", '[{}, "x", "x"]')
        redis_broker.lost_deliveries.fetch_lost(marker, "the-lost-fetch-id")
    with Connection(server.url(), transport=FRAMEWORK) as again:
        again.default_channel  # noqa: B018
    assert server.client().hexists("unacked", "some-tag")


def test_redis_brokers_use_the_framework_transport() -> None:
    redis = build_celery_config(Settings(celery_broker_url="redis://127.0.0.1:6379/0"))
    assert redis["broker_transport"].endswith("redis_broker:Transport")
    amqp = build_celery_config(Settings(celery_broker_url="amqp://guest@127.0.0.1//"))
    assert "broker_transport" not in amqp


# -- waiting for messages: wake lists, never a BRPOP on the queue itself ---------------


def _drain_until(connection: Connection, received: list[Any], count: int, timeout: float) -> float:
    """Drain events until ``count`` messages came; the seconds it took."""
    began = time.monotonic()
    while len(received) < count and time.monotonic() - began < timeout:
        with contextlib.suppress(socket.timeout):
            connection.drain_events(timeout=0.2)
    return time.monotonic() - began


def test_a_waiting_consumer_is_woken_by_a_token_and_takes_the_message_atomically(
    server: RedisServer,
) -> None:
    client = server.client()
    wake = redis_broker._wake_key("q-wake")
    with Connection(server.url(), transport=FRAMEWORK) as consumer_side:
        queue = Queue("q-wake")
        received: list[Any] = []
        keep = [lambda _body, message: received.append(message)]
        with consumer_side.Consumer(queue, callbacks=keep):
            _drain_until(consumer_side, received, 1, 0.5)  # nothing queued: it waits
            # It waits on the wake list, not on the queue (whose BRPOP would take the message).
            assert server.blocked_clients() == 1
            with Connection(server.url(), transport=FRAMEWORK) as publisher:
                publisher.Producer().publish({"n": 1}, routing_key="q-wake", declare=[queue])
            # Redis answered the wait (the consumer has not read the answer yet) with the
            # token: the message is still queued, so a consumer dying now loses nothing.
            assert wait_until(lambda: server.blocked_clients() == 0, 5)
            assert client.llen("q-wake") == 1
            assert client.llen(wake) == 0
            took = _drain_until(consumer_side, received, 1, 5)
            assert [m.payload["n"] for m in received] == [1]
            # Woken, not timed out (a wait ends after a second without a token).
            assert took < 0.5, took
            # Taken by the fetch: recorded as unacknowledged; the token is gone with it.
            assert client.hlen("unacked") == 1
            assert client.llen(wake) == 0
            received[0].ack()


def test_a_message_published_without_a_token_is_taken_when_the_wait_times_out(
    server: RedisServer,
) -> None:
    """A foreign client (kombu's own transport) pushes no token: a second, not lost."""
    with Connection(server.url(), transport=FRAMEWORK) as consumer_side:
        queue = Queue("q-foreign")
        received: list[Any] = []
        keep = [lambda _body, message: received.append(message)]
        with consumer_side.Consumer(queue, callbacks=keep):
            _drain_until(consumer_side, received, 1, 0.5)
            with Connection(server.url(), transport=KOMBU) as publisher:
                publisher.Producer().publish({"n": 2}, routing_key="q-foreign", declare=[queue])
            took = _drain_until(consumer_side, received, 1, 5)
            assert [m.payload["n"] for m in received] == [2]
            assert took < 2.5, took  # brpop_timeout (1 s) and a fetch
            received[0].ack()


def test_tokens_of_messages_taken_without_a_wait_are_deleted_with_the_last_one(
    server: RedisServer,
) -> None:
    """Messages published while no one waits leave tokens; the fetch that empties the
    queue deletes them, so that no worker is woken later to find nothing."""
    client = server.client()
    wake = redis_broker._wake_key("q-tokens")
    queue = Queue("q-tokens")
    with Connection(server.url(), transport=FRAMEWORK) as publisher:
        producer = publisher.Producer()
        for n in range(5):
            producer.publish({"n": n}, routing_key="q-tokens", declare=[queue])
    assert client.llen(wake) == 5
    with Connection(server.url(), transport=FRAMEWORK) as consumer_side:
        received: list[Any] = []
        keep = [lambda _body, message: received.append(message)]
        with consumer_side.Consumer(queue, callbacks=keep) as consumer:
            consumer.qos(prefetch_count=3)
            _drain_until(consumer_side, received, 3, 5)
            assert client.llen(wake) == 5  # two messages still queued: their tokens stay
            for message in received:
                message.ack()
            _drain_until(consumer_side, received, 5, 5)
            assert [m.payload["n"] for m in received] == list(range(5))
            assert client.llen(wake) == 0
            for message in received[3:]:
                message.ack()


def test_a_message_put_back_on_its_queue_wakes_a_waiting_consumer(server: RedisServer) -> None:
    client = server.client()
    wake = redis_broker._wake_key("q-requeue")
    queue = Queue("q-requeue")
    with Connection(server.url(), transport=FRAMEWORK) as publisher:
        publisher.Producer().publish({"n": 3}, routing_key="q-requeue", declare=[queue])
    with Connection(server.url(), transport=FRAMEWORK) as consumer_side:
        received: list[Any] = []
        keep = [lambda _body, message: received.append(message)]
        with consumer_side.Consumer(queue, callbacks=keep):
            _drain_until(consumer_side, received, 1, 5)
            assert client.llen(wake) == 0
            received[0].reject(requeue=True)
            assert client.llen("q-requeue") == 1
            assert client.llen(wake) == 1  # the requeue's token, after the message
            took = _drain_until(consumer_side, received, 2, 5)
            assert [m.payload["n"] for m in received] == [3, 3]
            assert took < 0.5, took
            received[1].ack()


def test_batched_publishes_and_expiring_queues_leave_a_token_after_each_message(
    server: RedisServer,
) -> None:
    """``delay_many`` publishes through kombu's publish batch; a queue with an expiry
    publishes with a pipeline of kombu's: both wake a waiting worker as one publish does."""
    client = server.client()
    batched, expiring = Queue("q-batched"), Queue("q-expiring", expires=60)
    with Connection(server.url(), transport=FRAMEWORK) as publisher:
        producer = publisher.Producer()
        with producer.batch(max_size=100):
            for n in range(3):
                producer.publish({"n": n}, routing_key="q-batched", declare=[batched])
        producer.publish({"n": 0}, routing_key="q-expiring", declare=[expiring])
    assert client.llen("q-batched") == 3
    assert client.llen(redis_broker._wake_key("q-batched")) == 3
    assert client.llen("q-expiring") == 1
    assert client.pttl("q-expiring") > 0  # kombu's expiry kept
    assert client.llen(redis_broker._wake_key("q-expiring")) == 1
