"""Raw reads of hangar devices, and the contract record a read becomes within a work session.

Torque controllers (Open Protocol, through the bridge `services.torque.bridge`) publish one
`mro.op_result/1` per tightening result: `torque_read` makes it a read whose identity is
(controller, tightening id), and `record_body` a `torque_event` within the session.

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
from decimal import Decimal
from typing import Any, Literal

import msgspec

from services.devices.malformed import Malformed
from services.devices.partmark import PartMark, parse_partmark
from services.devices.rfid import TagRead, parse_impinj, parse_zebra
from services.torque.results import MappingError, to_torque_fields
from services.torque.telegram import ResultTelegram, ToolCalibration, result_event_id, telegram_sha256, tightening_of
from shared.contract import SCHEMA, FieldError
from shared.runtime.messages import WorkSessionOpened

# the contract's device kind of a record made from a raw device's read
CONTRACT_KIND = {"rfid_zebra": "rfid_reader", "rfid_impinj": "rfid_reader", "partmark_scanner": "barcode_scanner",
                 "torque_controller": "torque_wrench"}
RECORD_TYPE = {"receive": "part_receipt", "install": "part_installation", "remove": "part_removal"}
# event ids of records made from reads: uuid5 in this namespace (deterministic, so a redelivered
# publish makes the same record and is deduplicated by its idempotency key)
READS_NAMESPACE = uuid.UUID("6f1d3a52-8c1e-5b7a-9d40-2e6a1c0b9f31")

Problem = Literal["framing_lost", "incomplete_mark", "not_a_part_tag", "tool_calibration_unknown"]
_number = msgspec.json.Encoder(decimal_format="number").encode


class TorqueSource(msgspec.Struct, frozen=True, kw_only=True, tag="torque.result/1"):
    """A tightening result as the controller sent it (the telegram, whole) with what the bridge
    added: the controller's zone and the tool's own calibration (MID 0041)."""

    telegram: str
    telegram_sha256: str
    revision: int
    tightening_id: int
    identifier: str
    zone: str
    tool: ToolCalibration | None = None


class RawRead(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One read by one raw device. `read_id` is derived from the device and the read itself,
    so a publish delivered twice gives the same ids. `source` is the parser's whole result
    (USER memory kept raw as hex)."""

    read_id: str
    device_kind: str
    device_id: str
    received_at: str
    occurred_at: str
    source: TagRead | PartMark | TorqueSource
    cage: str | None = None
    part_number: str | None = None
    serial: str | None = None
    problem: Problem | None = None

    @property
    def part_key(self) -> str:
        """What a session records once: a part, or one controller's tightening."""
        if isinstance(self.source, TorqueSource):
            return f"torque|{self.device_id}|{self.source.tightening_id}"
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
    """One record per part per session: the same part read again in it names the same event. A
    tightening names one event whatever the session: (controller, tightening id)."""
    if isinstance(read.source, TorqueSource):
        return result_event_id(read.device_id, read.source.telegram)
    return str(uuid.uuid5(READS_NAMESPACE, f"{session_id}|{read.part_key}"))


def torque_read_id(controller_id: str, telegram: str) -> str:
    """The read id of a result: (controller, tightening id), like its event id."""
    return _read_id("torque_controller", controller_id, result_event_id(controller_id, telegram))


def torque_read(controller_id: str, sent: ResultTelegram, received_at: str) -> RawRead | list[FieldError]:
    """The read of one tightening result, or why it cannot be one (a DLQ report: a telegram that
    is not a MID 0061 we read, a unit other than N·m, a local time that does not exist).

    A result whose tool has no calibration known from its own data (no MID 0041 answer yet, or
    another tool than the one it described) is a read with problem `tool_calibration_unknown`:
    kept, never given a guessed calibration date."""
    result = tightening_of(sent.telegram)
    if result is None:
        return [FieldError("$.telegram", "op_telegram", "an Open Protocol MID 0061 telegram of revision 1-7",
                           f"{len(sent.telegram)} characters, not readable")]
    try:
        fields = to_torque_fields(result, sent.zone)
    except MappingError as exc:
        return [FieldError("$.telegram", "op_result", str(exc)[:200], f"tightening {result.tightening_id}")]
    serial = fields.tool_serial_number or (sent.tool.serial_number if sent.tool else None)
    tool = sent.tool if sent.tool is not None and sent.tool.serial_number == serial else None
    revision_text = sent.telegram[8:11].strip(" ")  # blank or 000 means revision 1
    source = TorqueSource(telegram=sent.telegram, telegram_sha256=telegram_sha256(sent.telegram),
                          revision=max(1, int(revision_text)) if revision_text.isdigit() else 1,
                          tightening_id=result.tightening_id,
                          identifier=fields.identifier.strip(), zone=sent.zone, tool=tool)
    return RawRead(read_id=torque_read_id(controller_id, sent.telegram), device_kind="torque_controller",
                   device_id=controller_id, received_at=received_at,
                   occurred_at=fields.occurred_at.strftime("%Y-%m-%dT%H:%M:%SZ"), source=source,
                   problem=None if tool is not None else "tool_calibration_unknown")


def _torque_body(session: WorkSessionOpened, read: RawRead, source: TorqueSource) -> dict[str, Any]:
    result = tightening_of(source.telegram)
    if result is None or source.tool is None:
        raise ValueError(f"read {read.read_id} cannot be made a torque_event")
    fields = to_torque_fields(result, source.zone)
    notes = (f"Open Protocol MID 0061 revision {source.revision}, telegram SHA-256 {source.telegram_sha256}; "
             f"tool's own last calibration {source.tool.last_calibration} (MID 0041)")
    body: dict[str, Any] = {
        "schema": SCHEMA,
        "type": "torque_event",
        "event_id": event_id_of(session.session_id, read),
        "occurred_at": read.occurred_at,
        "station": session.station,
        "device": {"kind": CONTRACT_KIND[read.device_kind], "id": read.device_id},
        "work_order_id": session.work_order_id,
        "aircraft": dict(session.aircraft),
        "ata": session.ata,
        "technician": dict(session.technician),
        "tool": {"serial_number": source.tool.serial_number,
                 "calibration_due": source.tool.calibration_due.isoformat()},
        "fastener_ref": f"PSET-{fields.parameter_set_id}",  # the controller's parameter set: what it tightened to
        "torque_nm": Decimal(fields.torque_nm),
        "torque_min_nm": Decimal(fields.torque_min_nm),
        "torque_max_nm": Decimal(fields.torque_max_nm),
        "result": fields.result,
        "tightening_id": fields.tightening_id,
        "angle_deg": Decimal(fields.angle_deg),
        "notes": notes,
    }
    return body


def record_json(session: WorkSessionOpened, read: RawRead) -> bytes:
    """`record_body` as the JSON a device would send (quantities as JSON numbers)."""
    return _number(record_body(session, read))


def record_body(session: WorkSessionOpened, read: RawRead) -> dict[str, Any]:
    """The device contract v1 body a read makes within `session` (the read must name a part, or
    be a tightening with its tool's calibration)."""
    if isinstance(read.source, TorqueSource):
        if read.problem is not None:
            raise ValueError(f"read {read.read_id} ({read.problem}): it is never made a record")
        return _torque_body(session, read, read.source)
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
