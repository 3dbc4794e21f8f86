"""The local circuit breaker (seed 002): a stage that keeps failing freezes instead of dropping work.

A batch whose commit fails stays unacked for another try. After FREEZE_AFTER failures in a row
the stage is `frozen`: an alarm goes to maintenance control, retries slow down, and an operator
may ask for one at once (`mro-edge resume`, a `resume` command on the stage's control topic).
The first batch that commits again thaws it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import msgspec

FREEZE_AFTER = 3
RETRY_S = 0.5
FROZEN_RETRY_S = 5.0


class Freeze:
    def __init__(self, log, alarm: Callable[[str, str], None], on_change: Callable[[], None]):
        self.log = log
        self._alarm = alarm
        self._on_change = on_change
        self.failures = 0
        self.frozen = False
        self._resume = threading.Event()

    def on_control(self, payload: bytes) -> None:
        """A command on `mro/<station>/pipeline/control/<stage>` (in paho's thread)."""
        try:
            command = msgspec.json.decode(payload).get("command")
        except (msgspec.DecodeError, AttributeError):
            return
        if command == "resume":
            self.log.info("resume requested", state_transition="RESUME_REQUESTED")
            self._resume.set()

    def failed(self, exc: Exception) -> None:
        """Count a failed batch; freeze after FREEZE_AFTER in a row."""
        self.failures += 1
        self.log.error("batch failed; kept for retry", error=str(exc)[:200], failures=self.failures,
                       state_transition="STALLED")
        if self.failures >= FREEZE_AFTER and not self.frozen:
            self.frozen = True
            self._alarm("frozen",
                        f"{self.failures} failures in a row: {type(exc).__name__}: {str(exc)[:200]}")
            self._on_change()

    def wait(self) -> None:
        """Before the retry: short while failing, long while frozen, cut short by `resume`."""
        self._resume.wait(FROZEN_RETRY_S if self.frozen else RETRY_S)
        self._resume.clear()

    def recovered(self) -> None:
        self.failures = 0
        if self.frozen:
            self.frozen = False
            self._alarm("resumed", "the stage processes records again")
            self._on_change()
