"""Retry policies and queues: the specification's two tables, as data."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Literal, get_args

from .exceptions import TaskDefinitionError

# Importing Celery at run time too changes nothing (it is loaded already): pragma: no mutate
if TYPE_CHECKING:  # pragma: no mutate
    from celery import Celery

RetryPolicyName = Literal["standard", "aggressive", "high_priority", "long_running", "no_retry"]
QueueName = Literal["high_priority", "default", "low_priority"]

QUEUE_NAMES: Final[tuple[QueueName, ...]] = get_args(QueueName)

# The app setting (from BACKGROUND_RETRY_DELAY_SCALE) that multiplies every retry delay.
SCALE_SETTING: Final = "background_retry_delay_scale"


def delay_scale(app: Celery) -> float:
    """The factor every retry delay of ``app``'s tasks is multiplied by (0: retry at once)."""
    return float(app.conf.get(SCALE_SETTING, 1.0))


# The random part of a retry delay, as a fraction of its nominal delay, added on top.
JITTER: Final = 0.25


# Frozen and slotted so no code changes a shared policy; nothing tries to. pragma: no mutate
@dataclass(frozen=True, slots=True)  # pragma: no mutate
class RetryPolicy:
    """How often and how late a failed task is tried again, and how long it may run.

    The n-th retry (n = 0, 1, ...) waits at least its nominal delay,
    ``initial_delay * backoff**n`` capped at ``max_delay``, and at most
    ``JITTER`` (a quarter) more: the stated delay is a floor (the first retry of
    a 60 s policy never comes before 60 s), and the random part on top keeps
    many failing tasks from retrying in lockstep.
    """

    name: RetryPolicyName
    max_retries: int
    initial_delay: float
    max_delay: float
    soft_time_limit: float
    time_limit: float
    backoff: float = 2.0

    def nominal_delay(self, retries: int) -> float:
        """The least wait before the retry that follows ``retries`` earlier retries."""
        return float(min(self.initial_delay * self.backoff**retries, self.max_delay))

    def longest_delay_for(self, retries: int) -> float:
        """The most that same retry can wait: its nominal delay plus the whole jitter."""
        return self.nominal_delay(retries) * (1 + JITTER)

    def delay_for(
        self, retries: int, scale: float = 1.0, rng: random.Random | None = None
    ) -> float:
        """Seconds to wait before the retry that follows ``retries`` earlier retries."""
        nominal = self.nominal_delay(retries) * scale
        return nominal + (rng or random).random() * JITTER * nominal

    @property
    def longest_delay(self) -> float:
        """The longest wait this policy can produce (before scaling), jitter included."""
        # No policy has one retry, and no_retry's delays are 0 anyway: "== 1" is the same here.
        if self.max_retries == 0:  # pragma: no mutate
            return 0.0
        return self.longest_delay_for(self.max_retries - 1)


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
