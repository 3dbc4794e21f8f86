"""The link state the uplink trusts: the heartbeat's retained `status/connectivity`.

It starts knowing nothing (UNKNOWN: no calls). Messages the broker kept for our persistent
session arrive before the retained one and are older, so they are not trusted on their own;
only if no retained state comes within RETAINED_WAIT_S of the connection (none was ever
published) is the newest of them taken. A state with a lower epoch than one already seen is
older and ignored.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import msgspec

from shared.runtime.mqtt import Inbound

ISOLATED, RECONCILING, UNKNOWN = "ISOLATED", "RECONCILING", "UNKNOWN"
USABLE = frozenset({"CONNECTED", "DEGRADED", RECONCILING})  # link states in which the uplink calls
RETAINED_WAIT_S = 2.0


class Connectivity(msgspec.Struct):
    """The fields of the heartbeat's connectivity status the uplink acts on."""

    state: str
    epoch: int | None = None


_decode_connectivity = msgspec.json.Decoder(Connectivity).decode

# called with (previous state, new state, whether the epoch moved) before a change is taken
LinkChange = Callable[[str, str, bool], None]


class LinkWatch:
    """The current link state and epoch, from the heartbeat's messages (in paho's thread)."""

    def __init__(self, log, on_change: LinkChange):
        self.log = log
        self._on_change = on_change
        self.state = UNKNOWN  # until the heartbeat's retained state says otherwise
        self.epoch: int | None = None
        self.known = False
        self._pending: Connectivity | None = None
        self._connected_at: float | None = None

    def usable(self) -> bool:
        return self.state in USABLE

    def on_mqtt_connect(self) -> None:
        if self._connected_at is None:
            self._connected_at = time.monotonic()

    def on_connectivity(self, message: Inbound) -> bool:
        """Whether the state or epoch changed."""
        try:
            status = _decode_connectivity(message.payload)
        except msgspec.DecodeError:  # also a wrong type, e.g. a boolean epoch
            return False
        if self.known or message.retain:
            self.known = True
            return self.set(status.state, status.epoch)
        if self._pending is None or _not_older(status.epoch, self._pending.epoch):
            self._pending = status  # kept for us while we were away: maybe stale
        return False

    def adopt_pending(self) -> bool:
        """No retained state came after the connection: the newest one published is current."""
        if self.known or self._connected_at is None or self._pending is None:
            return False
        if time.monotonic() - self._connected_at < RETAINED_WAIT_S:
            return False
        self.known = True
        self.log.info("no retained link state; taking the newest one published", state=self._pending.state)
        return self.set(self._pending.state, self._pending.epoch)

    def set(self, state: str, epoch: int | None = None) -> bool:
        """Take `state` unless it is older than the current one; whether it changed anything."""
        if not _not_older(epoch, self.epoch):
            return False  # an older state, delivered late
        previous = self.state
        new_epoch = epoch is not None and epoch != self.epoch
        if state == previous and not new_epoch:
            return False
        self._on_change(previous, state, new_epoch)
        self.epoch = epoch if epoch is not None else self.epoch
        self.state = state
        if state != previous:
            self.log.info("link state seen", state_transition=f"LINK_{previous}->{state}", epoch=epoch)
        return True


def _not_older(epoch: int | None, than: int | None) -> bool:
    """Whether a link state with `epoch` may replace one with `than` (no epoch: no order)."""
    return epoch is None or than is None or epoch >= than
