"""A part-mark scan as a read, and the part record it makes within a session.

A part mark has no time of its own: its read is timed when the box received it; its id is the
scanner's and the mark's, so the same mark scanned again is the same read. A mark whose framing
was lost, or that lacks the CAGE, part number or serial, is a read with a `problem`: kept, never
given guessed fields.
"""

from __future__ import annotations

import hashlib
from typing import Any

from services.devices.malformed import Malformed
from services.devices.profiles.base import RawRead, part_body, payload_sha256, raw_note, read_id_of
from services.devices.profiles.partmark_15434.parser import parse_partmark
from shared.runtime.messages import WorkSessionOpened

NAME = "partmark_15434"
DEVICE_KIND = "partmark_scanner"
CONTRACT_KIND = "barcode_scanner"


def reads(device_id: str, payload: bytes, received_at: str) -> list[RawRead] | Malformed:
    mark = parse_partmark(payload)
    if isinstance(mark, Malformed):
        return mark
    common: dict[str, Any] = {
        "read_id": read_id_of(DEVICE_KIND, device_id, hashlib.sha256(mark.raw.encode()).hexdigest()),
        "device_kind": DEVICE_KIND, "device_id": device_id, "received_at": received_at,
        "occurred_at": received_at, "source": mark, "raw_sha256": payload_sha256(payload),
    }
    if mark.framing_lost:
        return [RawRead(**common, problem="framing_lost")]
    if not (mark.cage and mark.part_number and mark.serial):
        return [RawRead(**common, problem="incomplete_mark")]
    return [RawRead(**common, cage=mark.cage, part_number=mark.part_number, serial=mark.serial)]


def record(session: WorkSessionOpened, read: RawRead) -> dict[str, Any]:
    return part_body(session, read, CONTRACT_KIND, raw_note(read, NAME, "scan"))
