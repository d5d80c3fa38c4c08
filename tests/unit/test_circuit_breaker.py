"""CircuitBreaker: transitions, the half-open probe, which errors count, async, threads."""

from __future__ import annotations

import threading

import pytest

from app.core.background import is_retriable
from app.core.background.extras import CircuitBreaker, CircuitBreakerOpen
from app.core.background.observability import task_metrics


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def boom() -> None:
    raise ConnectionError("service down")


def trip(breaker: CircuitBreaker, times: int) -> None:
    for _ in range(times):
        with pytest.raises(ConnectionError):
            breaker.call(boom)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def breaker(clock: Clock) -> CircuitBreaker:
    return CircuitBreaker(
        name="email_service", failure_threshold=3, recovery_timeout=30, clock=clock
    )


def test_spec_usage_passes_calls_and_results_through() -> None:
    breaker = CircuitBreaker(name="email_service", failure_threshold=5)
    assert breaker.call(lambda to, subject: f"{to}:{subject}", to="a@b", subject="hi") == "a@b:hi"
    assert breaker.state == "closed"


def test_opens_after_threshold_consecutive_failures(breaker: CircuitBreaker) -> None:
    trip(breaker, 2)
    assert breaker.state == "closed"
    trip(breaker, 1)
    assert breaker.state == "open"
    calls = []
    with pytest.raises(CircuitBreakerOpen) as raised:
        breaker.call(calls.append, 1)
    assert calls == []  # the service is not called while open
    assert raised.value.retry_after == pytest.approx(30)


def test_a_success_resets_the_failure_count(breaker: CircuitBreaker) -> None:
    trip(breaker, 2)
    breaker.call(lambda: None)
    trip(breaker, 2)
    assert breaker.state == "closed"


def test_half_open_lets_one_probe_through_and_success_closes(
    breaker: CircuitBreaker, clock: Clock
) -> None:
    trip(breaker, 3)
    clock.now += 10
    with pytest.raises(CircuitBreakerOpen) as raised:
        breaker.call(lambda: None)
    assert raised.value.retry_after == pytest.approx(20)
    clock.now += 20
    assert breaker.state == "half_open"

    inside = []

    def probe() -> str:
        # While the probe runs, every other caller is refused.
        with pytest.raises(CircuitBreakerOpen):
            breaker.call(lambda: None)
        inside.append(True)
        return "up"

    assert breaker.call(probe) == "up"
    assert inside == [True]
    assert breaker.state == "closed"
    trip(breaker, 2)
    assert breaker.state == "closed"  # the count started again from zero


def test_failed_probe_opens_again_for_a_full_timeout(breaker: CircuitBreaker, clock: Clock) -> None:
    trip(breaker, 3)
    clock.now += 30
    trip(breaker, 1)
    assert breaker.state == "open"
    clock.now += 29
    with pytest.raises(CircuitBreakerOpen):
        breaker.call(lambda: None)


def test_a_probe_that_never_reports_frees_its_slot_after_the_timeout(
    breaker: CircuitBreaker, clock: Clock
) -> None:
    trip(breaker, 3)
    clock.now += 30
    # A probe admitted, whose process then died: nothing is recorded.
    assert breaker._storage.admit(breaker.recovery_timeout).probe
    with pytest.raises(CircuitBreakerOpen):
        breaker.call(lambda: None)
    clock.now += 30
    assert breaker.call(lambda: "ok") == "ok"
    assert breaker.state == "closed"


def test_excluded_and_non_failure_exceptions_do_not_count(clock: Clock) -> None:
    class NotFound(Exception):
        pass

    breaker = CircuitBreaker(
        name="api", failure_threshold=1, failure_exceptions=(ConnectionError, TimeoutError),
        exclude=(ConnectionRefusedError,), clock=clock,
    )  # fmt: skip

    def raise_(exc: Exception) -> None:
        raise exc

    with pytest.raises(NotFound):
        breaker.call(raise_, NotFound())
    with pytest.raises(ConnectionRefusedError):
        breaker.call(raise_, ConnectionRefusedError())
    assert breaker.state == "closed"
    with pytest.raises(TimeoutError):
        breaker.call(raise_, TimeoutError())
    assert breaker.state == "open"


async def test_call_async_guards_coroutines(breaker: CircuitBreaker, clock: Clock) -> None:
    async def fetch(value: int) -> int:
        return value * 2

    async def down() -> None:
        raise ConnectionError("down")

    assert await breaker.call_async(fetch, 21) == 42
    for _ in range(3):
        with pytest.raises(ConnectionError):
            await breaker.acall(down)
    with pytest.raises(CircuitBreakerOpen):
        await breaker.call_async(fetch, 1)
    clock.now += 30
    assert await breaker.call_async(fetch, 2) == 4
    assert breaker.state == "closed"


def test_threads_are_not_serialised_by_the_breaker(breaker: CircuitBreaker) -> None:
    """A slow call in one thread does not hold up calls in another (no lock across calls)."""
    started, release = threading.Event(), threading.Event()

    def slow() -> str:
        started.set()
        assert release.wait(10)
        return "slow"

    results: list[str] = []
    thread = threading.Thread(target=lambda: results.append(breaker.call(slow)))
    thread.start()
    assert started.wait(10)
    assert breaker.call(lambda: "fast") == "fast"
    release.set()
    thread.join(10)
    assert results == ["slow"]


def test_concurrent_failures_are_all_counted(clock: Clock) -> None:
    breaker = CircuitBreaker(name="many", failure_threshold=400, clock=clock)
    barrier = threading.Barrier(8)

    def worker() -> None:
        barrier.wait()
        for _ in range(50):
            with pytest.raises(ConnectionError):
                breaker.call(boom)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert breaker.state == "open"  # exactly 400 failures: none lost to a race


def test_open_breaker_error_is_retriable_and_carries_retry_after(
    breaker: CircuitBreaker,
) -> None:
    trip(breaker, 3)
    with pytest.raises(CircuitBreakerOpen) as raised:
        breaker.call(lambda: None)
    assert is_retriable(raised.value)
    assert raised.value.retry_after > 0
    assert "email_service" in str(raised.value)


def test_state_is_published_as_a_metric(breaker: CircuitBreaker, clock: Clock) -> None:
    gauge = task_metrics().breaker_state.labels("email_service")
    trip(breaker, 3)
    assert gauge._value.get() == 1
    clock.now += 30
    breaker.call(lambda: None)
    assert gauge._value.get() == 0


def test_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="failure_threshold"):
        CircuitBreaker(name="x", failure_threshold=0)
    with pytest.raises(ValueError, match="recovery_timeout"):
        CircuitBreaker(name="x", recovery_timeout=0)
