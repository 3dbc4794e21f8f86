"""The connectivity state machine of DESIGN.md section 5, as a pure function.

CONNECTED -> DEGRADED    a probe slower than the threshold, or failing
DEGRADED  -> CONNECTED   a good probe
DEGRADED  -> ISOLATED    `isolate_after` bad probes in a row (counting the first)
ISOLATED  -> RECONCILING the gateway answers a probe well again
RECONCILING -> CONNECTED the uplink backlog is drained and the gateway's chain head equals ours
RECONCILING -> ISOLATED  a probe fails again
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import msgspec


class Link(StrEnum):
    CONNECTED = "CONNECTED"
    DEGRADED = "DEGRADED"
    ISOLATED = "ISOLATED"
    RECONCILING = "RECONCILING"


class UplinkView(msgspec.Struct, frozen=True):
    """The fields of the uplink's retained status the heartbeat acts on or republishes; the
    rest of that status is the uplink's own."""

    state: str | None = None
    link: str | None = None
    link_epoch: int | None = None
    in_sync: bool | None = None
    backlog: int | None = None
    acked_seq: int | None = None


_decode_uplink_view = msgspec.json.Decoder(UplinkView).decode


def decode_uplink_view(payload: bytes) -> UplinkView | None:
    """The uplink status, or None for anything that is not one (a wrong type, not JSON)."""
    try:
        return _decode_uplink_view(payload)
    except msgspec.DecodeError:
        return None


@dataclass(frozen=True)
class Probe:
    ok: bool
    latency_ms: float


@dataclass(frozen=True)
class Thresholds:
    slow_probe_ms: float = 2000
    isolate_after: int = 3


def after_probe(state: Link, bad_streak: int, probe: Probe, limits: Thresholds) -> tuple[Link, int]:
    """(next state, consecutive bad probes) after one probe."""
    bad = not probe.ok or probe.latency_ms > limits.slow_probe_ms
    streak = bad_streak + 1 if bad else 0
    match state:
        case Link.CONNECTED:
            return (Link.DEGRADED if bad else Link.CONNECTED), streak
        case Link.DEGRADED:
            if not bad:
                return Link.CONNECTED, 0
            return (Link.ISOLATED if streak >= limits.isolate_after else Link.DEGRADED), streak
        case Link.ISOLATED:
            return (Link.ISOLATED if bad else Link.RECONCILING), streak
        case Link.RECONCILING:
            return (Link.ISOLATED if not probe.ok else Link.RECONCILING), streak
    raise ValueError(f"unknown link state {state!r}")


def after_uplink(state: Link, in_sync: bool) -> Link:
    """RECONCILING ends once the uplink reports it is drained and in sync with the gateway."""
    return Link.CONNECTED if state == Link.RECONCILING and in_sync else state
