"""Circuit breaker (CLOSED / OPEN / HALF_OPEN) and the one retry policy of the project.

The breaker stops hammering a peer that keeps failing: after `failures` failures in a row it
opens; after `reset_s` it lets one trial call through (HALF_OPEN); that call closes it again
or re-opens it.
"""

from __future__ import annotations

import time

from tenacity import (
    AsyncRetrying,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    stop_never,
    wait_exponential_jitter,
)

CLOSED, OPEN, HALF_OPEN = "CLOSED", "OPEN", "HALF_OPEN"


class CircuitBreaker:
    def __init__(self, failures: int = 5, reset_s: float = 30.0, clock=time.monotonic):
        self.threshold = failures
        self.reset_s = reset_s
        self._clock = clock
        self.state = CLOSED
        self.failures = 0
        self.opened_at = 0.0

    def allow(self) -> bool:
        """May a call go out now? Moves OPEN -> HALF_OPEN once the reset time has passed."""
        if self.state == OPEN and self._clock() - self.opened_at >= self.reset_s:
            self.state = HALF_OPEN
        return self.state != OPEN

    def trial(self) -> None:
        """The peer is known to answer again (e.g. a health probe passed): OPEN -> HALF_OPEN now,
        without waiting for the reset time. One call decides, as after the reset time."""
        if self.state == OPEN:
            self.state = HALF_OPEN

    def success(self) -> None:
        self.state, self.failures = CLOSED, 0

    def failure(self) -> None:
        self.failures += 1
        if self.state == HALF_OPEN or self.failures >= self.threshold:
            self.state, self.opened_at = OPEN, self._clock()


def retrying(attempts: int, retry_on: tuple[type[BaseException], ...], *, initial_s: float = 0.2,
             max_s: float = 10.0) -> Retrying:
    """Exponential backoff with jitter between attempts (initial_s * 2**n plus up to initial_s
    at random, at most max_s), re-raising the last error."""
    return Retrying(
        stop=stop_after_attempt(attempts),
        wait=wait_exponential_jitter(multiplier=initial_s, max=max_s, jitter=initial_s),
        retry=retry_if_exception_type(retry_on),
        reraise=True,
    )


def reconnecting(retry_on: tuple[type[BaseException], ...], *, initial_s: float = 0.2, max_s: float = 10.0,
                 before_sleep=None) -> AsyncRetrying:
    """The same backoff for an asyncio link that retries until cancelled (a device connection):
    it never gives up, the caller's task is cancelled to stop it."""
    return AsyncRetrying(
        stop=stop_never,
        wait=wait_exponential_jitter(multiplier=initial_s, max=max_s, jitter=initial_s),
        retry=retry_if_exception_type(retry_on),
        before_sleep=before_sleep,
        reraise=True,
    )
