"""shared/runtime/breaker.py: the circuit breaker (CLOSED / OPEN / HALF_OPEN) on a fake clock, and the
retry policy (exponential backoff with jitter, only for the errors it is told to retry)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.runtime.breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreaker, retrying


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


def test_starts_closed_and_lets_calls_through(clock) -> None:
    breaker = CircuitBreaker(3, 10.0, clock)
    assert breaker.state == CLOSED and breaker.allow()


def test_opens_after_threshold_failures_in_a_row(clock) -> None:
    breaker = CircuitBreaker(3, 10.0, clock)
    breaker.failure()
    breaker.failure()
    assert breaker.state == CLOSED and breaker.allow()
    breaker.failure()
    assert breaker.state == OPEN and not breaker.allow()


def test_a_success_resets_the_count(clock) -> None:
    breaker = CircuitBreaker(3, 10.0, clock)
    for _ in range(10):
        breaker.failure()
        breaker.failure()
        breaker.success()
    assert breaker.state == CLOSED and breaker.failures == 0


def test_open_until_the_reset_time_then_half_open(clock) -> None:
    breaker = CircuitBreaker(1, 10.0, clock)
    breaker.failure()
    clock.advance(9.999)
    assert not breaker.allow() and breaker.state == OPEN
    clock.advance(0.001)  # exactly reset_s
    assert breaker.allow() and breaker.state == HALF_OPEN


def test_half_open_success_closes(clock) -> None:
    breaker = CircuitBreaker(2, 5.0, clock)
    breaker.failure()
    breaker.failure()
    clock.advance(5)
    assert breaker.allow()
    breaker.success()
    assert breaker.state == CLOSED and breaker.failures == 0 and breaker.allow()
    breaker.failure()
    assert breaker.state == CLOSED, "the count starts again from zero after closing"


def test_half_open_failure_reopens_and_restarts_the_timer(clock) -> None:
    breaker = CircuitBreaker(5, 5.0, clock)
    for _ in range(5):
        breaker.failure()
    clock.advance(7)
    assert breaker.allow() and breaker.state == HALF_OPEN
    breaker.failure()  # one failure is enough in HALF_OPEN, whatever the threshold
    assert breaker.state == OPEN and breaker.opened_at == clock.now
    clock.advance(4.9)
    assert not breaker.allow()
    clock.advance(0.1)
    assert breaker.allow() and breaker.state == HALF_OPEN


def test_trial_skips_the_wait_only_when_open(clock) -> None:
    breaker = CircuitBreaker(1, 60.0, clock)
    breaker.trial()
    assert breaker.state == CLOSED
    breaker.failure()
    assert breaker.state == OPEN
    breaker.trial()
    assert breaker.state == HALF_OPEN and breaker.allow()
    breaker.trial()
    assert breaker.state == HALF_OPEN
    breaker.failure()
    assert breaker.state == OPEN


ops = st.lists(st.one_of(st.just("success"), st.just("failure"), st.just("allow"), st.just("trial"),
                         st.floats(min_value=0, max_value=20, allow_nan=False)), max_size=100)


@settings(max_examples=300, deadline=None)
@given(ops=ops, threshold=st.integers(1, 6), reset_s=st.floats(min_value=0.5, max_value=10))
def test_against_a_model(ops, threshold, reset_s) -> None:
    clock = Clock()
    breaker = CircuitBreaker(threshold, reset_s, clock)
    state, run, opened = CLOSED, 0, 0.0
    for op in ops:
        before = breaker.state
        if isinstance(op, float):
            clock.advance(op)
        elif op == "allow":
            if state == OPEN and clock.now - opened >= reset_s:
                state = HALF_OPEN
            assert breaker.allow() == (state != OPEN)
        elif op == "trial":
            state = HALF_OPEN if state == OPEN else state
            breaker.trial()
        elif op == "success":
            state, run = CLOSED, 0
            breaker.success()
        else:
            run += 1
            if state == HALF_OPEN or run >= threshold:
                state, opened = OPEN, clock.now
            breaker.failure()
        assert breaker.state == state
        assert (before, breaker.state) in {
            (CLOSED, CLOSED), (CLOSED, OPEN), (OPEN, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, HALF_OPEN),
            (HALF_OPEN, OPEN), (HALF_OPEN, CLOSED), (OPEN, CLOSED),
        }, (before, breaker.state)


class Flaky(Exception):
    pass


class Fatal(Exception):
    pass


def test_retrying_retries_only_the_listed_errors() -> None:
    calls = []

    def call(fail_times: int, error: type[Exception]) -> str:
        calls.append(1)
        if len(calls) <= fail_times:
            raise error("no")
        return "ok"

    for attempt in retrying(3, (Flaky,), initial_s=0.001, max_s=0.002):
        with attempt:
            result = call(2, Flaky)
    assert result == "ok" and len(calls) == 3

    calls.clear()
    with pytest.raises(Flaky):
        for attempt in retrying(3, (Flaky,), initial_s=0.001, max_s=0.002):
            with attempt:
                call(5, Flaky)
    assert len(calls) == 3, "gives up after the attempts, re-raising the last error"

    calls.clear()
    with pytest.raises(Fatal):
        for attempt in retrying(3, (Flaky,), initial_s=0.001, max_s=0.002):
            with attempt:
                call(5, Fatal)
    assert len(calls) == 1, "an error it is not told to retry is raised at once"


def test_retrying_backs_off_exponentially_with_jitter() -> None:
    policy = retrying(6, (Flaky,), initial_s=0.5, max_s=4.0)
    for _ in range(50):
        for n in range(5):
            wait = policy.wait(type("State", (), {"attempt_number": n + 1})())
            base = 0.5 * 2 ** n
            assert min(base, 4.0) <= wait <= min(base + 0.5, 4.0), (n, wait)
