"""The specification's retry table, and how delays grow."""

from __future__ import annotations

import random

import pytest

from app.core.background import RETRY_POLICIES
from app.core.background.internals.retry import delay_scale, get_retry_policy

SPEC_TABLE = {
    "standard": (3, 60),
    "aggressive": (5, 30),
    "high_priority": (3, 120),
    "long_running": (2, 300),
    "no_retry": (0, 0),
}


@pytest.mark.parametrize(("name", "row"), SPEC_TABLE.items())
def test_policies_match_the_specification(name: str, row: tuple[int, int]) -> None:
    policy = get_retry_policy(name)
    assert (policy.max_retries, policy.initial_delay) == row


def test_every_policy_is_in_the_table() -> None:
    assert set(RETRY_POLICIES) == set(SPEC_TABLE)


# The README's table: (initial delay, growth factor, cap, documented longest
# wait of any retry) per policy. Growth: each retry waits twice the previous
# nominal delay; the jitter adds up to 25% on top, never takes anything off.
README_TABLE = {
    "standard": (60, 2, 900, 300),
    "aggressive": (30, 2, 900, 600),
    "high_priority": (120, 2, 900, 600),
    "long_running": (300, 2, 900, 750),
}


@pytest.mark.parametrize(("name", "row"), README_TABLE.items())
def test_every_delay_is_at_least_nominal_and_at_most_the_documented_maximum(
    name: str, row: tuple[int, int, int, int]
) -> None:
    initial, growth, cap, longest = row
    policy = get_retry_policy(name)
    assert (policy.initial_delay, policy.backoff, policy.max_delay) == (initial, growth, cap)
    assert policy.longest_delay == longest
    rng = random.Random(7)
    for retries in range(policy.max_retries):
        nominal = min(initial * growth**retries, cap)
        delays = [policy.delay_for(retries, rng=rng) for _ in range(2000)]
        # The stated delay is a floor: the first retry never comes before "Initial Delay".
        assert min(delays) >= nominal
        assert max(delays) <= nominal * 1.25 <= longest
        assert max(delays) - min(delays) > nominal / 8  # there is jitter


def test_the_extremes_of_the_jitter_are_the_bounds() -> None:
    """A random draw of 0 gives the nominal delay, one close to 1 the maximum."""

    class Fixed(random.Random):
        def __init__(self, value: float) -> None:
            super().__init__()
            self.value = value

        def random(self) -> float:
            return self.value

    policy = get_retry_policy("standard")
    assert policy.delay_for(0, rng=Fixed(0.0)) == 60
    assert policy.delay_for(0, rng=Fixed(0.999999)) == pytest.approx(75)
    assert policy.longest_delay_for(0) == 75


def test_delays_are_capped() -> None:
    policy = get_retry_policy("aggressive")
    assert policy.nominal_delay(20) == policy.max_delay
    assert policy.delay_for(20) <= policy.max_delay * 1.25


def test_scale_multiplies_and_zero_retries_at_once() -> None:
    policy = get_retry_policy("standard")
    assert policy.delay_for(0, scale=0) == 0
    assert 0.6 <= policy.delay_for(0, scale=0.01) <= 0.75


def test_the_visibility_timeout_check_counts_the_jitter() -> None:
    """Redis re-delivers a retry that waits longer than the timeout: the check uses the maximum."""
    from app.core.background.celery_app import build_celery_config
    from app.core.config import Settings

    # long_running's second retry may wait 600 s x 1.25 = 750 s (its time limit is 1860 s).
    base = {"celery_broker_url": "redis://127.0.0.1:6379/0", "background_retry_delay_scale": 3}
    with pytest.raises(ValueError, match="longest retry delay"):
        build_celery_config(Settings(**{**base, "celery_visibility_timeout": 2200}))
    build_celery_config(Settings(**{**base, "celery_visibility_timeout": 2300}))


def test_longest_delay_stays_below_the_default_visibility_timeout() -> None:
    from app.core.config import Settings

    timeout = Settings().celery_visibility_timeout
    for policy in RETRY_POLICIES.values():
        assert policy.longest_delay < timeout
        assert policy.time_limit < timeout


# The README's "Each policy also sets Celery's time limits (soft / hard)".
README_TIME_LIMITS = {
    "standard": (300, 330),
    "aggressive": (300, 330),
    "high_priority": (60, 90),
    "long_running": (1800, 1860),
    "no_retry": (300, 330),
}


@pytest.mark.parametrize(("name", "limits"), README_TIME_LIMITS.items())
def test_time_limits_and_cap_are_the_documented_ones(name: str, limits: tuple[int, int]) -> None:
    policy = get_retry_policy(name)
    assert (policy.soft_time_limit, policy.time_limit) == limits
    assert policy.max_delay == (0 if name == "no_retry" else README_TABLE[name][2])
    assert policy.backoff == 2


def test_a_policy_without_retries_never_waits() -> None:
    assert get_retry_policy("no_retry").longest_delay == 0
    assert get_retry_policy("standard").longest_delay == 240 * 1.25  # the third retry's


def test_unknown_policy_and_queue_names_are_definition_errors() -> None:
    from app.core.background import TaskDefinitionError
    from app.core.background.internals.retry import check_queue

    with pytest.raises(TaskDefinitionError, match=r"unknown retry_policy 'fast'; valid: standard"):
        get_retry_policy("fast")
    with pytest.raises(TaskDefinitionError, match=r"unknown queue 'urgent'; valid: high_priority"):
        check_queue("urgent")
    assert check_queue("low_priority") == "low_priority"


def test_an_app_without_the_setting_keeps_the_policies_delays() -> None:
    """A Celery app not built by the framework's factory has no scale: delays as documented."""
    from celery import Celery

    assert delay_scale(Celery("plain", set_as_current=False)) == 1.0
    scaled = Celery("scaled", set_as_current=False)
    scaled.conf.background_retry_delay_scale = 0.5
    assert delay_scale(scaled) == 0.5
