"""Fixtures of the fault tests: the completions table and private services."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.reliability.support import PrivateRedis, RabbitVhost, create_completions_table
from tests.support.services import Services, rabbitmq_available, unavailable


@pytest.fixture(scope="session")
def completions_db(stack: Services) -> Services:
    """This run's PostgreSQL database, with the completions table."""
    create_completions_table(stack.postgres_dsn)
    return stack


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    """A redis-server of our own, so that no other test's worker consumes our messages."""
    try:
        server = PrivateRedis().start()
    except (FileNotFoundError, RuntimeError) as exc:
        unavailable(f"cannot start a private redis-server ({exc})")
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def rabbit() -> Iterator[RabbitVhost]:
    """A private virtual host on the shared RabbitMQ, deleted afterwards."""
    reason = rabbitmq_available() or RabbitVhost.available()
    if reason:
        unavailable(reason)
    vhost = RabbitVhost().create()
    try:
        yield vhost
    finally:
        vhost.delete()
