"""Raw reads of hangar devices, and the contract record a read becomes within a work session.

Pure functions, no storage: `reads_of` parses one publish of a raw device kind (Zebra and
Impinj reader events, ISO/IEC 15434 part marks; `services.devices`) into `RawRead`s;
`record_body` maps a read and the open session at its place to a device contract v1 body
(`part_receipt` / `part_installation` / `part_removal` by the session's part action), which
ingest then decodes like any device's record, so it is validated, signed and receipted alike.

A read that cannot name a part is never given guessed fields: `problem` says why
(`framing_lost`: the scanner lost the 15434 envelope; `incomplete_mark`: no CAGE, part number
or serial; `not_a_part_tag`: an EPC that is not ADI-var), and such a read is kept unassigned.
"""

from __future__ import annotations

import hashlib
import uuid
from typing import Any, Literal

import msgspec

from services.devices.malformed import Malformed
from services.devices.partmark import PartMark, parse_partmark
from services.devices.rfid import TagRead, parse_impinj, parse_zebra
from shared.contract import SCHEMA
from shared.runtime.messages import WorkSessionOpened

# the contract's device kind of a record made from a raw device's read
CONTRACT_KIND = {"rfid_zebra": "rfid_reader", "rfid_impinj": "rfid_reader", "partmark_scanner": "barcode_scanner"}
RECORD_TYPE = {"receive": "part_receipt", "install": "part_installation", "remove": "part_removal"}
# event ids of records made from reads: uuid5 in this namespace (deterministic, so a redelivered
# publish makes the same record and is deduplicated by its idempotency key)
READS_NAMESPACE = uuid.UUID("6f1d3a52-8c1e-5b7a-9d40-2e6a1c0b9f31")

Problem = Literal["framing_lost", "incomplete_mark", "not_a_part_tag"]


class RawRead(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One read by one raw device. `read_id` is derived from the device and the read itself,
    so a publish delivered twice gives the same ids. `source` is the parser's whole result
    (USER memory kept raw as hex)."""

    read_id: str
    device_kind: str
    device_id: str
    received_at: str
    occurred_at: str
    source: TagRead | PartMark
    cage: str | None = None
    part_number: str | None = None
    serial: str | None = None
    problem: Problem | None = None

    @property
    def part_key(self) -> str:
        return f"{self.cage}|{self.part_number}|{self.serial}"


def _read_id(device_kind: str, device_id: str, *parts: str) -> str:
    return hashlib.sha256("\x1f".join((device_kind, device_id, *parts)).encode()).hexdigest()[:32]


def _tag(device_kind: str, device_id: str, read: TagRead, received_at: str) -> RawRead:
    common: dict[str, Any] = {
        "read_id": _read_id(device_kind, device_id, read.epc_hex.upper(), read.read_at),
        "device_kind": device_kind, "device_id": device_id, "received_at": received_at,
        "occurred_at": read.read_at, "source": read,
    }
    if read.part is None:
        return RawRead(**common, problem="not_a_part_tag")
    return RawRead(**common, cage=read.part.cage, part_number=read.part.part_number, serial=read.part.serial)


def _mark(device_kind: str, device_id: str, mark: PartMark, received_at: str) -> RawRead:
    common: dict[str, Any] = {
        "read_id": _read_id(device_kind, device_id, hashlib.sha256(mark.raw.encode()).hexdigest()),
        "device_kind": device_kind, "device_id": device_id, "received_at": received_at,
        "occurred_at": received_at, "source": mark,
    }
    if mark.framing_lost:
        return RawRead(**common, problem="framing_lost")
    if not (mark.cage and mark.part_number and mark.serial):
        return RawRead(**common, problem="incomplete_mark")
    return RawRead(**common, cage=mark.cage, part_number=mark.part_number, serial=mark.serial)


def reads_of(device_kind: str, device_id: str, payload: bytes, received_at: str) -> list[RawRead] | Malformed:
    """The reads one publish of a raw device kind holds, or why it holds none (a DLQ report).

    A part mark has no time of its own: its read is timed when the box received it; its id is
    the scanner's and the mark's, so the same mark scanned again is the same read."""
    if device_kind == "partmark_scanner":
        mark = parse_partmark(payload)
        return mark if isinstance(mark, Malformed) else [_mark(device_kind, device_id, mark, received_at)]
    parsed = parse_zebra(payload) if device_kind == "rfid_zebra" else parse_impinj(payload)
    if isinstance(parsed, Malformed):
        return parsed
    return [_tag(device_kind, device_id, read, received_at) for read in parsed.reads]


def event_id_of(session_id: str, read: RawRead) -> str:
    """One record per part per session: the same part read again in it names the same event."""
    return str(uuid.uuid5(READS_NAMESPACE, f"{session_id}|{read.part_key}"))


def record_body(session: WorkSessionOpened, read: RawRead) -> dict[str, Any]:
    """The device contract v1 body a part read makes within `session` (the read must name a part)."""
    if read.problem is not None or not (read.cage and read.part_number and read.serial):
        raise ValueError(f"read {read.read_id} names no part ({read.problem}): it is never made a record")
    body: dict[str, Any] = {
        "schema": SCHEMA,
        "type": RECORD_TYPE[session.part_action],
        "event_id": event_id_of(session.session_id, read),
        "occurred_at": read.occurred_at,
        "station": session.station,
        "device": {"kind": CONTRACT_KIND[read.device_kind], "id": read.device_id},
        "work_order_id": session.work_order_id,
        "aircraft": dict(session.aircraft),
        "ata": session.ata,
        "technician": dict(session.technician),
        "part": {"cage": read.cage, "part_number": read.part_number, "serial_number": read.serial,
                 "condition": session.condition},
    }
    if session.position is not None:
        body["position"] = session.position
    if session.part_action == "remove":
        body["removal_reason"] = session.removal_reason
    return body
