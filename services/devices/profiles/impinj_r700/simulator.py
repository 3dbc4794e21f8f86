"""What an Impinj R700 publishes for its tag reads: IoT device interface tagInventory events in
the shape of tests/vectors/devices/impinj_iot.json, with ADI-var EPCs written by `encode_adi_var`."""

from __future__ import annotations

import base64
import json
import random
from datetime import UTC, datetime
from typing import Any

from services.devices.epc import encode_adi_var
from services.devices.profiles.base import random_part


def reader_time(at: datetime) -> str:
    """The reader's clock as the R700 writes it: UTC with nanoseconds."""
    at = at.astimezone(UTC)
    return at.strftime("%Y-%m-%dT%H:%M:%S.") + f"{at.microsecond:06d}000Z"


def event(epc_hex: str, at: datetime, *, hostname: str = "impinj-14-2b-3c", antenna_port: int | None = 1,
          peak_rssi_cdbm: int | None = -5325, tid_hex: str | None = None, epc_as: str = "base64") -> dict[str, Any]:
    """One tagInventory event; `epc_as` "base64" (the R700's default `epc`), "hex" (`epcHex`) or
    "both" (they agree)."""
    tag: dict[str, Any] = {}
    if epc_as in ("base64", "both"):
        tag["epc"] = base64.b64encode(bytes.fromhex(epc_hex)).decode()
    if epc_as in ("hex", "both"):
        tag["epcHex"] = epc_hex.upper()
    if tid_hex is not None:
        tag["tidHex"] = tid_hex
    if antenna_port is not None:
        tag["antennaPort"] = antenna_port
        tag["antennaName"] = f"Antenna {antenna_port}"
    if peak_rssi_cdbm is not None:
        tag["peakRssiCdbm"] = peak_rssi_cdbm
    return {"timestamp": reader_time(at), "hostname": hostname, "eventType": "tagInventory",
            "tagInventoryEvent": tag}


def status_event(at: datetime, hostname: str = "impinj-14-2b-3c") -> dict[str, Any]:
    """An inventory status event: not a tag read (the parser counts it as skipped)."""
    return {"timestamp": reader_time(at), "hostname": hostname, "eventType": "inventoryStatus",
            "inventoryStatusEvent": {"inventoryStatus": "running"}}


def payload(events: list[dict[str, Any]], *, array: bool = False) -> bytes:
    """The publish: one event (the MQTT and stream outputs), or an array (the webhook)."""
    if not array and len(events) != 1:
        raise ValueError("a bare event is exactly one event")
    return json.dumps(events if array else events[0]).encode()


def part_event(cage: str, part_number: str, serial: str, at: datetime, **options: Any) -> dict[str, Any]:
    """An event reading an aviation part tag (ADI-var, filter 0)."""
    return event(encode_adi_var(0, cage, part_number, serial), at, **options)


def simulate(rng: random.Random) -> bytes:
    """A realistic publish read now: one tagInventory event of a part tag."""
    return payload([part_event(*random_part(rng), datetime.now(UTC), antenna_port=rng.randint(1, 4),
                               peak_rssi_cdbm=rng.randint(-7500, -4000))])
