"""The asyncio pool's result writer connects as Celery's own result client does (loop_writes.py)."""

from __future__ import annotations

import ssl

import pytest
import redis.asyncio

from app.core.background import celery_app
from app.core.background.internals.transport.loop_writes import async_client
from app.core.background.internals.transport.result_backend import AtomicRedisBackend


@pytest.mark.parametrize(
    ("url", "connection_class", "where"),
    [
        ("redis://:secret@cache.internal:6390/3", redis.asyncio.Connection,
         {"host": "cache.internal", "port": 6390, "db": 3, "password": "secret"}),
        ("rediss://:secret@cache.internal:6380/4?ssl_cert_reqs=required",
         redis.asyncio.SSLConnection,
         {"host": "cache.internal", "port": 6380, "db": 4, "ssl_cert_reqs": ssl.CERT_REQUIRED}),
        ("socket:///run/redis.sock?virtual_host=2", redis.asyncio.UnixDomainSocketConnection,
         {"path": "/run/redis.sock", "db": 2}),
    ],
)  # fmt: skip
def test_the_settings_of_celerys_result_client_carry_over(
    url: str, connection_class: type[object], where: dict[str, object]
) -> None:
    backend = AtomicRedisBackend(app=celery_app, url=url)
    pool = async_client(backend.connparams).connection_pool
    assert pool.connection_class is connection_class
    assert {key: pool.connection_kwargs.get(key) for key in where} == where
    # Celery's timeouts, not redis-py's defaults.
    assert pool.connection_kwargs["socket_timeout"] == backend.connparams["socket_timeout"]
