"""What the bridge publishes for one MID 0061 and what ingest reads of it: `mro.op_result/1`.

The bridge does not map results itself: only ingest knows the work sessions, and only a record
made inside ingest's transaction can be acknowledged as durable. So the bridge publishes the
telegram exactly as the controller sent it, with what ingest needs beside it (the controller's
zone, the tool's own calibration from MID 0041), on `mro/<station>/in/torque_controller/<id>`.

The identity of a result is (controller, tightening id): `result_event_id` derives the event id
of the record from them, so a result the controller sends again after a reconnect names the
same event and ingest answers it as a duplicate. A telegram that does not decode has no
tightening id; its identity is the SHA-256 of its bytes.
"""

from __future__ import annotations

import hashlib
import uuid
from datetime import date
from typing import Literal

import msgspec

from services.torque.codec import DecodeError
from services.torque.mids import TighteningResult, decode

SCHEMA: Literal["mro.op_result/1"] = "mro.op_result/1"
KIND = "torque_controller"  # the intake topic kind the bridge publishes on
# event ids of torque records: uuid5 in this namespace of "controller|tightening id"
RESULTS_NAMESPACE = uuid.UUID("3b8e6c1d-7a52-5f04-b9e3-1d6f0a2c8e47")


class ToolCalibration(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The tool's own data (MID 0041): its serial and the day of its last calibration in the
    controller's zone; `calibration_due` is that day plus the controller's configured interval."""

    serial_number: str
    last_calibration: date
    calibration_due: date


class ResultTelegram(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One MID 0061 as the bridge received it. `telegram` is the frame without its NUL, as sent
    (Open Protocol is ASCII); `tool` is None while the controller has not answered MID 0040."""

    schema: Literal["mro.op_result/1"]
    telegram: str
    received_at: str
    zone: str
    tool: ToolCalibration | None = None


encode_telegram = msgspec.json.Encoder().encode
decode_telegram = msgspec.json.Decoder(ResultTelegram).decode


def telegram_sha256(telegram: str) -> str:
    return hashlib.sha256(telegram.encode("latin-1", "replace")).hexdigest()


def tightening_of(telegram: str) -> TighteningResult | None:
    """The decoded result, or None when the telegram is not a MID 0061 we can read."""
    try:
        body = decode(telegram.encode("latin-1", "replace")).body
    except (DecodeError, ValueError):
        return None
    return body if isinstance(body, TighteningResult) else None


def result_event_id(controller_id: str, telegram: str) -> str:
    """The event id of the record a result makes: (controller, tightening id), or the telegram's
    SHA-256 when it does not decode. Bridge and ingest both derive it, so the bridge knows which
    receipt answers its publish."""
    result = tightening_of(telegram)
    identity = str(result.tightening_id) if result is not None else "sha256:" + telegram_sha256(telegram)
    return str(uuid.uuid5(RESULTS_NAMESPACE, f"{controller_id}|{identity}"))
