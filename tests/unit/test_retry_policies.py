"""The specification's retry table, and how delays grow."""

from __future__ import annotations

import random

import pytest

from app.core.background import RETRY_POLICIES
from app.core.background.internals.retry import get_retry_policy

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


@pytest.mark.parametrize("name", ["standard", "aggressive", "high_priority", "long_running"])
def test_delays_start_at_the_initial_delay_grow_and_keep_a_floor(name: str) -> None:
    policy = get_retry_policy(name)
    rng = random.Random(7)
    for retries in range(policy.max_retries):
        nominal = min(policy.initial_delay * 2**retries, policy.max_delay)
        delays = [policy.delay_for(retries, rng=rng) for _ in range(500)]
        # Half fixed, half random: never below half the nominal delay, never above it.
        assert min(delays) >= nominal / 2
        assert max(delays) <= nominal
        assert max(delays) - min(delays) > nominal / 4  # there is jitter


def test_delays_are_capped() -> None:
    policy = get_retry_policy("aggressive")
    assert policy.delay_for(20) <= policy.max_delay


def test_scale_multiplies_and_zero_retries_at_once() -> None:
    policy = get_retry_policy("standard")
    assert policy.delay_for(0, scale=0) == 0
    assert 0.3 <= policy.delay_for(0, scale=0.01) <= 0.6


def test_longest_delay_stays_below_the_default_visibility_timeout() -> None:
    from app.core.config import Settings

    timeout = Settings().celery_visibility_timeout
    for policy in RETRY_POLICIES.values():
        assert policy.longest_delay < timeout
        assert policy.time_limit < timeout
