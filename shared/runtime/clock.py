"""The one clock format of the project: RFC 3339 UTC with milliseconds and `Z`.

Every timestamp this box writes on the wire, in status, alarms, receipts and run files uses
it, so operators and auditors compare times without reformatting them.
"""

from __future__ import annotations

from datetime import UTC, datetime


def utc_text(moment: datetime) -> str:
    """`moment` (timezone-aware) as e.g. `2026-12-02T01:20:03.512Z`."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def utc_now() -> str:
    """Now, in the one format."""
    return utc_text(datetime.now(UTC))


def utc_from_epoch(ts: float) -> str:
    """A Unix time (e.g. when the broker delivered a message), in the one format."""
    return utc_text(datetime.fromtimestamp(ts, UTC))


def parse_utc(text: str) -> datetime:
    """The inverse of `utc_text` (also accepts `+00:00` and other RFC 3339 offsets)."""
    return datetime.fromisoformat(text.replace("Z", "+00:00"))
