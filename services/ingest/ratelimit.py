"""Per-device token buckets: one device publishing too fast is refused, the others never notice.

Each device id has a bucket of `burst` tokens refilled at `rate_per_s`; a message takes one.
The buckets live in memory (a restart refills them, which only ever lets more through) and
are bounded: past `max_devices` buckets, the full ones (idle devices) are forgotten first.

The clock is ingest's, not the device's: MQTT 3.1.1 carries no publish time, so a backlog that
waited in the broker while ingest was down arrives at once. `burst` is therefore sized to
cover a device's backlog of a long outage (README, "Bad input and floods").
"""

from __future__ import annotations

import time
from collections.abc import Callable


class RateLimiter:
    def __init__(self, rate_per_s: float, burst: int, *, max_devices: int = 10_000,
                 clock: Callable[[], float] = time.monotonic):
        if rate_per_s < 0 or burst < 0:
            raise ValueError("rate_per_s and burst must be >= 0")
        self.rate = rate_per_s
        self.burst = float(burst)
        self.max_devices = max_devices
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # device id -> (tokens, at)

    @property
    def enabled(self) -> bool:
        """A rate of 0 turns the limit off (the bench's full-speed runs)."""
        return self.rate > 0

    def allow(self, device_id: str) -> bool:
        """Whether `device_id` may send one more message now (and take its token if so)."""
        if not self.enabled:
            return True
        now = self._clock()
        tokens, at = self._buckets.get(device_id, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        allowed = tokens >= 1.0
        self._buckets[device_id] = (tokens - 1.0 if allowed else tokens, now)
        if len(self._buckets) > self.max_devices:
            self._forget_idle(now)
        return allowed

    def _forget_idle(self, now: float) -> None:
        full = [d for d, (tokens, at) in self._buckets.items() if tokens + (now - at) * self.rate >= self.burst]
        for device_id in full or list(self._buckets)[: len(self._buckets) - self.max_devices]:
            del self._buckets[device_id]
