"""A tightening result (through the Open Protocol bridge) as a read, and the `torque_event` it
makes within a work session.

The identity of a result is (controller, tightening id): its read id and its record's event id
derive from them, so a result the controller sends again names the same read and event. The
record's `notes` carry the telegram's SHA-256, so it is in the signed entry; ingest keeps the
telegram's bytes under that hash (`mro-edge reads raw`).
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from services.devices.malformed import Malformed
from services.devices.profiles.base import RawRead, event_id_of, read_id_of
from services.devices.profiles.open_protocol.parser import TorqueSource, parse_result
from services.torque.results import MappingError, to_torque_fields
from services.torque.telegram import ResultTelegram, result_event_id, telegram_sha256, tightening_of
from shared.contract import SCHEMA, FieldError
from shared.runtime.messages import WorkSessionOpened

NAME = "open_protocol"
DEVICE_KIND = "torque_controller"
CONTRACT_KIND = "torque_wrench"


def torque_read_id(controller_id: str, telegram: str) -> str:
    """The read id of a result: (controller, tightening id), like its event id."""
    return read_id_of(DEVICE_KIND, controller_id, result_event_id(controller_id, telegram))


def telegram_bytes(telegram: str) -> bytes:
    """The telegram as the controller sent it (Open Protocol is ASCII): the bytes `telegram_sha256` hashes."""
    return telegram.encode("latin-1", "replace")


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
    digest = telegram_sha256(sent.telegram)
    source = TorqueSource(telegram=sent.telegram, telegram_sha256=digest,
                          revision=max(1, int(revision_text)) if revision_text.isdigit() else 1,
                          tightening_id=result.tightening_id,
                          identifier=fields.identifier.strip(), zone=sent.zone, tool=tool)
    return RawRead(read_id=torque_read_id(controller_id, sent.telegram), device_kind=DEVICE_KIND,
                   device_id=controller_id, received_at=received_at,
                   occurred_at=fields.occurred_at.strftime("%Y-%m-%dT%H:%M:%SZ"), source=source,
                   problem=None if tool is not None else "tool_calibration_unknown", raw_sha256=digest)


def reads(device_id: str, payload: bytes, received_at: str) -> list[RawRead] | Malformed:
    """The bridge's publish as its one read (ingest's torque path calls `torque_read` itself, to
    answer the bridge with receipts)."""
    sent = parse_result(payload)
    if isinstance(sent, Malformed):
        return sent
    read = torque_read(device_id, sent, received_at)
    return Malformed(NAME, read) if isinstance(read, list) else [read]


def record(session: WorkSessionOpened, read: RawRead) -> dict[str, Any]:
    """The `torque_event` a tightening with its tool's calibration makes within `session`."""
    source = read.source
    if not isinstance(source, TorqueSource) or read.problem is not None:
        raise ValueError(f"read {read.read_id} ({read.problem}): it is never made a record")
    result = tightening_of(source.telegram)
    if result is None or source.tool is None:
        raise ValueError(f"read {read.read_id} cannot be made a torque_event")
    fields = to_torque_fields(result, source.zone)
    notes = (f"Open Protocol MID 0061 revision {source.revision}, telegram SHA-256 {source.telegram_sha256}; "
             f"tool's own last calibration {source.tool.last_calibration} (MID 0041)")
    return {
        "schema": SCHEMA,
        "type": "torque_event",
        "event_id": event_id_of(session.session_id, read),
        "occurred_at": read.occurred_at,
        "station": session.station,
        "device": {"kind": CONTRACT_KIND, "id": read.device_id},
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
