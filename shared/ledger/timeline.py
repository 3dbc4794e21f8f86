"""Time in the ledger: `recorded_at` never goes backwards, and a clock step is an entry.

The sign service stamps each entry with `max(now, recorded_at of the entry before)`, so the
ledger's time is non-decreasing whatever the box's clock does. When the clock steps (set by
hand, by NTP after a boot without it, by a failing RTC), sign appends a ``clock_step`` entry:
body ``{from, to, delta_ms, synchronised}`` (`ClockStepBody`): what the clock said it was
(`from`, elapsed time since the last reading added), what it said then (`to`), the difference
in milliseconds, and whether the kernel called the clock synchronised. An auditor reading a run
of entries all stamped with the same time finds the reason right before it.

`TimeOrder` is the one check every verifier runs (the audit, the gateway): an entry whose
`recorded_at` is earlier than the one before it is a finding. It is not a broken chain (the
signatures hold), but the ledger's time can no longer be taken as the order of events there.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

CLOCK_STEP = "clock_step"
_UTC_MS = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{3}Z\Z"


class ClockStepBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The body of a ``clock_step`` entry (see the module doc)."""

    from_: Annotated[str, msgspec.Meta(pattern=_UTC_MS)] = msgspec.field(name="from")
    to: Annotated[str, msgspec.Meta(pattern=_UTC_MS)]
    delta_ms: int
    synchronised: bool | None = None


def clock_step_body(body: dict, synchronised: bool | None) -> dict:
    """The entry body of a step (`shared.runtime.clock.Step.body()`), checked against its schema."""
    full = {**body, "synchronised": synchronised}
    msgspec.convert(full, ClockStepBody, strict=True)
    return full


def parse_clock_step(body: dict) -> ClockStepBody:
    """A ``clock_step`` body; ValueError if it is not well formed."""
    try:
        return msgspec.convert(body, ClockStepBody, strict=True)
    except msgspec.ValidationError as exc:
        raise ValueError(f"a clock_step body is {{from, to, delta_ms, synchronised}}: {exc}") from None


class Backwards(msgspec.Struct, frozen=True):
    """Entry `seq` says `recorded_at`, earlier than `previous` of entry `previous_seq`."""

    seq: int
    recorded_at: str
    previous_seq: int
    previous: str

    @property
    def message(self) -> str:
        return (f"recorded_at goes backwards at seq {self.seq}: {self.recorded_at} is earlier than "
                f"{self.previous} of seq {self.previous_seq} (the box's clock was set back while "
                "it signed; entries after it are not in time order)")

    def as_dict(self) -> dict:
        return {"seq": self.seq, "recorded_at": self.recorded_at, "previous_seq": self.previous_seq,
                "previous": self.previous, "message": self.message}


class TimeOrder:
    """Follows `recorded_at` along a chain; `see` returns a `Backwards` finding when it drops.

    All entries carry `recorded_at` in one fixed form (UTC, milliseconds, `Z`), so their text
    order is their time order."""

    def __init__(self, previous_seq: int | None = None, previous: str | None = None) -> None:
        self.previous_seq = previous_seq
        self.previous = previous

    def see(self, seq: int, recorded_at: str) -> Backwards | None:
        previous, previous_seq = self.previous, self.previous_seq
        self.previous, self.previous_seq = recorded_at, seq
        if previous is not None and previous_seq is not None and recorded_at < previous:
            return Backwards(seq, recorded_at, previous_seq, previous)
        return None
