"""Raw reads of hangar devices, and the contract record a read becomes within a work session.

What each kind of device sends, and what its reads become, is its device profile's
(`services.devices.profiles`, one folder per kind, all listed in `registry.PROFILES`); this
module is ingest's way in: `reads_of` parses one publish of a raw device kind into `RawRead`s
by the profile of its topic kind, and `record_body` maps a read and the open session at its
place to a device contract v1 body (`part_receipt` / `part_installation` / `part_removal` by the
session's part action, `torque_event` for a tightening), which ingest then decodes like any
device's record, so it is validated, signed and receipted alike.

Every read names the SHA-256 of the bytes its device sent (`RawRead.raw_sha256`); the record
carries it in `notes`, so it is in the signed ledger entry, and ingest keeps the bytes under it
(`services.ingest.sessions.keep_raw`, `mro-edge reads raw`).

A read that cannot name a part is never given guessed fields: `problem` says why
(`framing_lost`: the scanner lost the 15434 envelope; `incomplete_mark`: no CAGE, part number
or serial; `not_a_part_tag`: an EPC that is not ADI-var), and such a read is kept unassigned.
"""

from __future__ import annotations

from typing import Any

import msgspec

from services.devices.malformed import Malformed
from services.devices.profiles.base import READS_NAMESPACE, RECORD_TYPE, Problem, RawRead, event_id_of
from services.devices.profiles.open_protocol.mapping import telegram_bytes, torque_read, torque_read_id
from services.devices.profiles.open_protocol.parser import TorqueSource
from services.devices.profiles.registry import CONTRACT_KIND, profile_of_kind
from shared.runtime.messages import WorkSessionOpened

__all__ = ["CONTRACT_KIND", "READS_NAMESPACE", "RECORD_TYPE", "Problem", "RawRead", "TorqueSource", "event_id_of",
           "reads_of", "record_body", "record_json", "telegram_bytes", "torque_read", "torque_read_id"]

_number = msgspec.json.Encoder(decimal_format="number").encode


def reads_of(device_kind: str, device_id: str, payload: bytes, received_at: str) -> list[RawRead] | Malformed:
    """The reads one publish of a raw device kind holds, or why it holds none (a DLQ report)."""
    return profile_of_kind(device_kind).reads(device_id, payload, received_at)


def record_body(session: WorkSessionOpened, read: RawRead) -> dict[str, Any]:
    """The device contract v1 body a read makes within `session` (the read must name a part, or
    be a tightening with its tool's calibration)."""
    return profile_of_kind(read.device_kind).record(session, read)


def record_json(session: WorkSessionOpened, read: RawRead) -> bytes:
    """`record_body` as the JSON a device would send (quantities as JSON numbers)."""
    return _number(record_body(session, read))
