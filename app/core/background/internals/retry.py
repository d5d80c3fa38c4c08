"""Retry policies and queues: the specification's two tables, as data."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Final, Literal, get_args

from .exceptions import TaskDefinitionError

RetryPolicyName = Literal["standard", "aggressive", "high_priority", "long_running", "no_retry"]
QueueName = Literal["high_priority", "default", "low_priority"]

QUEUE_NAMES: Final[tuple[QueueName, ...]] = get_args(QueueName)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often and how late a failed task is tried again, and how long it may run.

    The n-th retry (n = 0, 1, ...) waits ``initial_delay * backoff**n`` seconds,
    capped at ``max_delay``; half of that is fixed and half random, so a
    policy never retries sooner than half its nominal delay and many failing
    tasks do not retry in lockstep.
    """

    name: RetryPolicyName
    max_retries: int
    initial_delay: float
    max_delay: float
    soft_time_limit: float
    time_limit: float
    backoff: float = 2.0

    def delay_for(
        self, retries: int, scale: float = 1.0, rng: random.Random | None = None
    ) -> float:
        """Seconds to wait before the retry that follows ``retries`` earlier retries."""
        nominal = min(self.initial_delay * self.backoff**retries, self.max_delay) * scale
        jitter = (rng or random).random()
        return nominal / 2 + jitter * nominal / 2

    @property
    def longest_delay(self) -> float:
        """The longest wait this policy can produce (before scaling)."""
        if self.max_retries == 0:
            return 0.0
        return min(self.initial_delay * self.backoff ** (self.max_retries - 1), self.max_delay)


RETRY_POLICIES: Final[dict[RetryPolicyName, RetryPolicy]] = {
    policy.name: policy
    for policy in (
        RetryPolicy("standard", 3, 60, 900, soft_time_limit=300, time_limit=330),
        RetryPolicy("aggressive", 5, 30, 900, soft_time_limit=300, time_limit=330),
        RetryPolicy("high_priority", 3, 120, 900, soft_time_limit=60, time_limit=90),
        RetryPolicy("long_running", 2, 300, 900, soft_time_limit=1800, time_limit=1860),
        RetryPolicy("no_retry", 0, 0, 0, soft_time_limit=300, time_limit=330),
    )
}


def get_retry_policy(name: str) -> RetryPolicy:
    try:
        return RETRY_POLICIES[name]  # type: ignore[index]
    except KeyError:
        valid = ", ".join(RETRY_POLICIES)
        raise TaskDefinitionError(f"unknown retry_policy {name!r}; valid: {valid}") from None


def check_queue(name: str) -> QueueName:
    if name not in QUEUE_NAMES:
        valid = ", ".join(QUEUE_NAMES)
        raise TaskDefinitionError(f"unknown queue {name!r}; valid: {valid}")
    return name
