"""An Impinj IoT device interface publish (R700) as reads, and the part record a read makes
within a session."""

from __future__ import annotations

from typing import Any

from services.devices.malformed import Malformed
from services.devices.profiles.base import RawRead, part_body, raw_note, tag_reads
from services.devices.profiles.impinj_r700.parser import parse_impinj
from shared.runtime.messages import WorkSessionOpened

NAME = "impinj_r700"
DEVICE_KIND = "rfid_impinj"
CONTRACT_KIND = "rfid_reader"


def reads(device_id: str, payload: bytes, received_at: str) -> list[RawRead] | Malformed:
    """Every tag read of the event (or webhook array); each names the whole payload's hash."""
    return tag_reads(DEVICE_KIND, device_id, parse_impinj(payload), payload, received_at)


def record(session: WorkSessionOpened, read: RawRead) -> dict[str, Any]:
    return part_body(session, read, CONTRACT_KIND, raw_note(read, NAME, "event"))
