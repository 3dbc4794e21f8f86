"""What fixed RFID readers report, whatever their vendor: `TagRead`s, and the parsing both
reader profiles share.

The vendor formats themselves are device profiles (`services.devices.profiles`):
`zebra_iot_connector` (Zebra IoT Connector, FX7500/FX9600/ATR7000) and `impinj_r700` (Impinj IoT
device interface). Both give one event object or an array of them (`events_of`), are read field
by field with a `Collector` that gathers every problem as a `FieldError`, and turn an ADI-var EPC
into `part` (`services.devices.epc`, `with_part`); any other EPC is kept raw with
`epc_scheme: "other"` (not an aviation part tag).

Fields the vendors add across firmware versions are ignored, so an upgrade does not break
intake; the fields used are type-checked and a batch with any bad event is refused whole.
"""

from __future__ import annotations

import base64
import binascii
import re
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any, Literal

import msgspec

from services.devices.epc import AviationPart, decode_adi_var, is_adi_var
from services.devices.malformed import MAX_PAYLOAD, Malformed, field_error
from shared.contract.errors import FieldError
from shared.runtime.clock import utc_text

MAX_EVENTS = 1000
#: An EPC bank holds at most 496 bits of EPC; TID and USER banks are bounded by the tag chip.
MAX_EPC_HEX = 124
MAX_BANK_HEX = 2048
RSSI_RANGE = (Decimal(-200), Decimal(50))

ReaderKind = Literal["zebra_iotc", "impinj_iot"]


class TagRead(msgspec.Struct, frozen=True, tag="devices.tag_read/1"):
    """One read of one tag; `read_at` is the reader's time in UTC (the project's clock format).

    `reader_id` is what the reader says about itself (Impinj `hostname`); the reader's
    authenticated identity is its topic, which the caller knows. `rssi_dbm` is a Decimal
    so that nothing downstream holds a float.
    """

    reader_kind: ReaderKind
    reader_id: str | None
    epc_hex: str
    antenna: int | None
    rssi_dbm: Decimal | None
    read_at: str
    tid_hex: str | None = None
    user_hex: str | None = None
    reads: int | None = None
    epc_scheme: Literal["adi-var", "other"] = "other"
    part: AviationPart | None = None
    part_errors: list[FieldError] = msgspec.field(default_factory=list)


class TagReads(msgspec.Struct, frozen=True, tag="devices.tag_reads/1"):
    """What one payload held: its tag reads, and how many events were not tag reads."""

    reads: list[TagRead]
    skipped: int = 0


_decoder = msgspec.json.Decoder(float_hook=Decimal)
_TIMESTAMP = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?(Z|[+-]\d{2}:?\d{2})")
_HEX = re.compile(r"[0-9A-Fa-f]+")


class Collector:
    """Collects FieldErrors while the fields of one payload are read (by every reader profile)."""

    def __init__(self) -> None:
        self.errors: list[FieldError] = []

    def fail(self, path: str, rule: str, expected: str, value: Any = None, *, missing: bool = False) -> None:
        self.errors.append(field_error(path, rule, expected, value, missing=missing))

    def object(self, value: Any, path: str) -> dict | None:
        if type(value) is dict:
            return value
        self.fail(path, "type", "object", value)
        return None

    def text(self, obj: dict, key: str, path: str, *, required: bool = False) -> str | None:
        if key not in obj:
            if required:
                self.fail(f"{path}.{key}", "required", "string", missing=True)
            return None
        value = obj[key]
        if type(value) is not str:
            self.fail(f"{path}.{key}", "type", "string", value)
            return None
        return value

    def integer(self, obj: dict, key: str, path: str, low: int, high: int) -> int | None:
        if key not in obj:
            return None
        value = obj[key]
        if type(value) is not int or not low <= value <= high:
            self.fail(f"{path}.{key}", "range", f"integer {low}..{high}", value)
            return None
        return value

    def hex_field(self, obj: dict, key: str, path: str, limit: int, *, required: bool = False) -> str | None:
        value = self.text(obj, key, path, required=required)
        if value is None:
            return None
        if not _HEX.fullmatch(value) or len(value) % 2 or len(value) > limit:
            self.fail(f"{path}.{key}", "hex", f"an even number (2..{limit}) of hexadecimal digits", value)
            return None
        return value.upper()

    def base64_field(self, obj: dict, key: str, path: str, limit: int) -> str | None:
        value = self.text(obj, key, path)
        if value is None:
            return None
        try:
            raw = base64.b64decode(value.replace("-", "+").replace("_", "/") + "=" * (-len(value) % 4),
                                   validate=True)
        except (binascii.Error, ValueError):
            raw = b""
        if not raw or 2 * len(raw) > limit:
            self.fail(f"{path}.{key}", "base64", f"base64 (standard or URL-safe) of 1..{limit // 2} bytes", value)
            return None
        return raw.hex().upper()

    def timestamp(self, obj: dict, key: str, path: str) -> str | None:
        value = self.text(obj, key, path, required=True)
        if value is None:
            return None
        moment = parse_reader_time(value)
        if moment is None:
            self.fail(f"{path}.{key}", "timestamp",
                      "ISO 8601 date and time with an offset (Z, +hh:mm or -hhmm)", value)
            return None
        return utc_text(moment)


def parse_reader_time(text: str) -> datetime | None:
    """A reader's timestamp with its offset (`Z`, `+01:00`, `-0600`; up to nanoseconds), or None.

    A time without an offset is refused: the reader's zone cannot be guessed.
    """
    match = _TIMESTAMP.fullmatch(text)
    if match is None:
        return None
    year, month, day, hour, minute, second, fraction, offset = match.groups()
    micros = int((fraction or "0")[:6].ljust(6, "0"))
    try:
        if offset == "Z":
            zone = UTC
        else:
            digits = offset[1:].replace(":", "")
            if int(digits[:2]) > 23 or int(digits[2:]) > 59:
                return None
            delta = timedelta(hours=int(digits[:2]), minutes=int(digits[2:]))
            zone = timezone(-delta if offset[0] == "-" else delta)
        return datetime(int(year), int(month), int(day), int(hour), int(minute), int(second), micros, zone)
    except ValueError:
        return None


def events_of(payload: bytes, source: str) -> tuple[list[tuple[str, Any]], Malformed | None]:
    """The payload's events with their JSON paths: one object or an array of them."""
    if len(payload) > MAX_PAYLOAD:
        return [], Malformed(source, [field_error("$", "payload.size", f"at most {MAX_PAYLOAD} bytes",
                                                  f"{len(payload)} bytes")])
    try:
        document = _decoder.decode(payload)
    except (msgspec.DecodeError, RecursionError):  # msgspec raises RecursionError on deep nesting
        return [], Malformed(source, [field_error("$", "json", "a JSON object or array of objects",
                                                  payload[:80].decode("utf-8", "replace"))])
    if type(document) is dict:
        return [("$", document)], None
    if type(document) is list:
        if len(document) > MAX_EVENTS:
            return [], Malformed(source, [field_error("$", "events.count", f"at most {MAX_EVENTS} events",
                                                      document)])
        return [(f"$[{i}]", event) for i, event in enumerate(document)], None
    return [], Malformed(source, [field_error("$", "type", "a JSON object or array of objects", document)])


def rssi_of(value: Any, path: str, collect: Collector, scale: int) -> Decimal | None:
    """dBm from Zebra's `peakRssi` (a number of dBm, scale 1) or Impinj's `peakRssiCdbm` (an
    integer of centi-dBm, scale 100)."""
    if type(value) is int or (type(value) is Decimal and scale == 1):
        rssi = Decimal(value) / scale
        if RSSI_RANGE[0] <= rssi <= RSSI_RANGE[1]:
            return rssi
    unit = "dBm" if scale == 1 else "integer centi-dBm"
    low, high = (RSSI_RANGE[0] * scale, RSSI_RANGE[1] * scale)
    collect.fail(path, "range", f"number {low}..{high} ({unit})", value)
    return None


def with_part(read: TagRead) -> TagRead:
    """`read` with its EPC decoded when it is an ADI-var aviation part tag."""
    if not is_adi_var(read.epc_hex):
        return read
    decoded = decode_adi_var(read.epc_hex)
    if isinstance(decoded, AviationPart):
        return msgspec.structs.replace(read, epc_scheme="adi-var", part=decoded)
    return msgspec.structs.replace(read, epc_scheme="adi-var", part_errors=decoded)
