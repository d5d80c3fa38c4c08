"""Key helpers, period keys, lease lifetime and ``@periodic`` declarations (no services)."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import pytest
from celery.schedules import crontab

from app.core.background import TaskDefinitionError, celery_app, periodic, simple_task
from app.core.background.dedup import args_key, daily_key, lease_lifetime, notify_key, update_key
from app.core.background.internals.delivery.dedup import period_key
from app.core.background.internals.delivery.periodic import period_for
from app.core.background.internals.registry import PERIOD_HEADER


def test_spec_key_patterns() -> None:
    assert notify_key(42) == "notify-42"
    assert update_key("abc") == "update-abc"
    assert daily_key(date(2026, 11, 29)) == "daily-2026-11-29"
    assert daily_key().startswith("daily-")


def test_args_key_is_stable_and_argument_sensitive() -> None:
    first = args_key("mod.task", 1, "x", b=2, a=[1, 2])
    assert first == args_key("mod.task", 1, "x", a=[1, 2], b=2)
    assert first.startswith("mod.task:")
    assert first != args_key("mod.task", 1, "y", a=[1, 2], b=2)
    assert first != args_key("other.task", 1, "x", a=[1, 2], b=2)


NOW = datetime(2026, 11, 29, 13, 45, 30, tzinfo=UTC)


@pytest.mark.parametrize(
    ("period", "key", "end"),
    [
        ("minutely", "minutely-2026-11-29T13:45", datetime(2026, 11, 29, 13, 46, tzinfo=UTC)),
        ("hourly", "hourly-2026-11-29T13", datetime(2026, 11, 29, 14, tzinfo=UTC)),
        ("daily", "daily-2026-11-29", datetime(2026, 11, 30, tzinfo=UTC)),
        ("weekly", "weekly-2026-W48", datetime(2026, 11, 30, tzinfo=UTC)),
        ("monthly", "monthly-2026-11", datetime(2026, 12, 1, tzinfo=UTC)),
    ],
)
def test_named_periods(period: str, key: str, end: datetime) -> None:
    assert period_key(period, NOW) == (key, end.timestamp())


def test_interval_periods_are_aligned_on_the_epoch() -> None:
    key, end = period_key("every:60", NOW)
    assert key == f"every60s-{int(NOW.timestamp() // 60)}"
    assert end == (NOW.timestamp() // 60 + 1) * 60
    assert period_key("every:60", NOW + timedelta(seconds=10))[0] == key


def test_period_of_a_schedule() -> None:
    assert period_for(crontab(minute=0, hour=3), None) == "minutely"
    assert period_for(crontab(minute=0, hour=3), "daily") == "daily"
    assert period_for(timedelta(minutes=5), None) == "every:300"
    assert period_for(30, None) == "every:30"
    with pytest.raises(TaskDefinitionError, match="unknown period"):
        period_for(30, "fortnightly")


def test_lease_lifetime_covers_every_attempt_and_retry_delay() -> None:
    @simple_task(name="tests.unit.dedup_lifetime", retry_policy="standard")
    def task(ctx: object) -> None: ...

    # standard: 3 retries, delays 60/120/240, time limit 330; 4 attempts.
    # (60 + 120 + 240) s of nominal delays, each with up to 25% jitter on top.
    assert lease_lifetime(task, 1.0, 100) == 330 * 4 + 525 + 100
    assert lease_lifetime(task, 0.5, 0) == 330 * 4 + 262.5


def test_periodic_adds_a_beat_entry_with_its_period() -> None:
    @periodic(crontab(minute=0, hour=3), period="daily", name="tests.unit.nightly")
    @simple_task(name="tests.unit.dedup_nightly")
    def nightly(ctx: object) -> None: ...

    entry = celery_app.conf.beat_schedule["tests.unit.nightly"]
    assert entry["task"] == "tests.unit.dedup_nightly"
    assert entry["options"] == {"headers": {PERIOD_HEADER: "daily"}}


def test_periodic_needs_a_task() -> None:
    with pytest.raises(TaskDefinitionError, match="above @simple_task"):
        periodic(60)(lambda ctx: None)


# -- under mutation (scripts/mutation.sh dedup_keys) ---------------------------


def test_daily_key_takes_a_date_or_its_text() -> None:
    assert daily_key("2026-11-29") == "daily-2026-11-29"


def test_args_key_digest_is_32_hex_digits() -> None:
    name, digest = args_key("mod.task", 1).split(":")
    assert name == "mod.task"
    assert len(digest) == 32
    assert int(digest, 16) >= 0


def test_the_monthly_period_of_december_ends_on_the_first_of_january() -> None:
    december = datetime(2026, 12, 15, 8, tzinfo=UTC)
    assert period_key("monthly", december) == (
        "monthly-2026-12",
        datetime(2027, 1, 1, tzinfo=UTC).timestamp(),
    )
    january = datetime(2027, 1, 31, 23, 59, tzinfo=UTC)
    assert period_key("monthly", january)[1] == datetime(2027, 2, 1, tzinfo=UTC).timestamp()


def test_a_malformed_interval_period_is_refused() -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - float() says what is wrong
        period_key("every:60:5", NOW)


def test_a_tasks_own_time_limit_sets_the_lease_lifetime() -> None:
    @simple_task(name="tests.unit.dedup_own_limit", retry_policy="no_retry", time_limit=40)
    def task(ctx: object) -> None: ...

    # no_retry: one attempt, no delays: the task's 40 s, not the policy's limit.
    assert lease_lifetime(task, 1.0, 10) == 40 + 10


def test_a_skipped_duplicate_is_counted_under_its_task_and_queue() -> None:
    from prometheus_client import REGISTRY

    from app.core.background.internals.delivery.dedup import log_deduplicated

    labels = {"task": "tests.dedup.counted", "queue": "high_priority"}
    before = REGISTRY.get_sample_value("background_tasks_deduplicated_total", labels) or 0.0
    log_deduplicated("tests.dedup.counted", "id-1", "high_priority", where="dispatch")
    after = REGISTRY.get_sample_value("background_tasks_deduplicated_total", labels)
    assert after == before + 1
