"""What a Zebra IoT Connector reader publishes for its tag reads: tag data events in the shape
of tests/vectors/devices/zebra_iotc.json, with ADI-var EPCs written by `encode_adi_var`."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

from services.devices.epc import encode_adi_var
from services.devices.profiles.base import random_part


def reader_time(at: datetime, offset_minutes: int = -360) -> str:
    """The reader's clock as the connector writes it: milliseconds and a `-0600` offset."""
    local = at.astimezone(timezone(timedelta(minutes=offset_minutes)))
    return local.strftime("%Y-%m-%dT%H:%M:%S.") + f"{local.microsecond // 1000:03d}" + local.strftime("%z")


def event(epc_hex: str, at: datetime, *, antenna: int | None = 1, peak_rssi: int | Decimal | None = -52,
          reads: int | None = None, event_num: int = 1, mode: str = "SIMPLE", tid_hex: str | None = None,
          user_hex: str | None = None, offset_minutes: int = -360) -> dict[str, Any]:
    """One tag data event (`data.format` "epc", `idHex` the EPC in the reader's lower case)."""
    data: dict[str, Any] = {"eventNum": event_num, "format": "epc", "idHex": epc_hex.lower()}
    for key, value in (("antenna", antenna), ("peakRssi", peak_rssi), ("reads", reads), ("TID", tid_hex),
                       ("USER", user_hex)):
        if value is not None:
            data[key] = value
    return {"data": data, "timestamp": reader_time(at, offset_minutes), "type": mode}


def payload(events: list[dict[str, Any]], *, array: bool = True) -> bytes:
    """The publish: an array of events (what the connector batches), or one bare event."""
    if not array and len(events) != 1:
        raise ValueError("a bare event is exactly one event")
    document: Any = events if array else events[0]
    return json.dumps(document, default=str).encode()


def part_event(cage: str, part_number: str, serial: str, at: datetime, **options: Any) -> dict[str, Any]:
    """An event reading an aviation part tag (ADI-var, filter 0)."""
    return event(encode_adi_var(0, cage, part_number, serial), at, **options)


def simulate(rng: random.Random) -> bytes:
    """A realistic publish read now: one to three part tags, one array."""
    now = datetime.now(UTC)
    events = [part_event(*random_part(rng), now, antenna=rng.randint(1, 4), peak_rssi=rng.randint(-75, -40),
                         reads=rng.randint(1, 20), event_num=rng.randint(1, 10**6))
              for _ in range(rng.randint(1, 3))]
    return payload(events)
