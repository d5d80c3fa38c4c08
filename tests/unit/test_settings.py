"""Settings: the embedded default, and what production refuses."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from app.core.background.celery_app import build_celery_config
from app.core.config import Settings


def embedded(**overrides: object) -> Settings:
    values: dict[str, object] = {
        "database_url": "sqlite+aiosqlite:///./.data/app.db",
        "celery_broker_url": "filesystem://",
        "celery_result_backend": "db+sqlite:///.data/results.db",
        **overrides,
    }
    return Settings(**values)  # type: ignore[arg-type]


def test_embedded_default_is_refused_in_production() -> None:
    with pytest.raises(ValidationError, match="embedded filesystem:// broker is for development"):
        embedded(environment="production")


def test_sqlite_is_refused_in_production() -> None:
    with pytest.raises(ValidationError, match="SQLite is for development only"):
        embedded(environment="production", celery_broker_url="redis://127.0.0.1:6379/0")


def test_celery_config_is_json_only_with_late_acks() -> None:
    config = build_celery_config(embedded())
    assert config["accept_content"] == ["json"]
    assert config["task_serializer"] == "json"
    assert config["result_accept_content"] == ["json"]
    assert config["task_acks_late"] is True
    assert config["task_retry_on_worker_lost"] is True
    assert config["worker_prefetch_multiplier"] == 1
    assert config["broker_connection_retry_on_startup"] is True
    assert [q.name for q in config["task_queues"]] == ["high_priority", "default", "low_priority"]


def test_visibility_timeout_must_exceed_retry_delays_and_time_limits() -> None:
    with pytest.raises(ValueError, match="CELERY_VISIBILITY_TIMEOUT=600s must exceed"):
        build_celery_config(
            embedded(celery_broker_url="redis://127.0.0.1:6379/0", celery_visibility_timeout=600)
        )
    config = build_celery_config(embedded(celery_broker_url="redis://127.0.0.1:6379/0"))
    assert config["broker_transport_options"] == {
        "visibility_timeout": 3600,
        # A dispatch to a Redis that never answers times out (publish.py).
        "socket_timeout": 5.0,
        "socket_connect_timeout": 5.0,
    }


def test_retry_delay_scale_must_not_be_negative() -> None:
    with pytest.raises(ValidationError):
        embedded(background_retry_delay_scale=-1)


def test_sqlite_result_backend_is_refused_in_production() -> None:
    with pytest.raises(ValidationError, match="SQLite result backend is for development only"):
        embedded(
            environment="production",
            celery_broker_url="redis://127.0.0.1:6379/0",
            database_url="postgresql+asyncpg://postgres@127.0.0.1:5432/test",
        )


@pytest.mark.parametrize(
    ("broker", "chosen", "store_url"),
    [
        ("redis://127.0.0.1:6379/3", "RedisLeaseStore", "redis://127.0.0.1:6379/3"),
        ("rediss://cache.example:6380/0", "RedisLeaseStore", "rediss://cache.example:6380/0"),
        ("amqp://guest:guest@127.0.0.1:5672//", "DatabaseLeaseStore", "sqlite+aiosqlite:///x.db"),
        ("filesystem://", "DatabaseLeaseStore", "sqlite+aiosqlite:///x.db"),
    ],
)
def test_auto_dedup_backend_follows_the_broker(broker: str, chosen: str, store_url: str) -> None:
    """``auto``: leases in the broker's Redis when the broker is Redis, else in the database."""
    from app.core.background.internals.delivery.dedup import store_from_settings

    settings = embedded(celery_broker_url=broker, database_url="sqlite+aiosqlite:///x.db")
    store = store_from_settings(settings)()
    assert type(store).__name__ == chosen
    assert store.url == store_url


def test_an_explicit_dedup_backend_wins_over_the_broker() -> None:
    from app.core.background.internals.delivery.dedup import store_from_settings

    settings = embedded(
        celery_broker_url="redis://127.0.0.1:6379/0",
        background_dedup_backend="database",
        background_dedup_database_url="sqlite+aiosqlite:///leases.db",
    )
    store = store_from_settings(settings)()
    assert type(store).__name__ == "DatabaseLeaseStore"
    assert store.url == "sqlite+aiosqlite:///leases.db"
