"""Tag events of fixed RFID readers, parsed into `TagRead`s.

Two vendor formats, each published by the reader on a raw MQTT topic of its own:

* **Zebra IoT Connector** (FX7500, FX9600, ATR7000; `parse_zebra`): one event object or an array
  of them, `{"data": {"idHex", "antenna"?, "peakRssi"?, "reads"?, "format"?, "TID"?, "USER"?,
  "eventNum"?, "userDefined"?, ...}, "timestamp", "type"}`. `timestamp` carries the reader's
  offset, e.g. `2024-09-05T01:07:01.785-0600`; `type` is the operating mode (SIMPLE, CUSTOM,
  INVENTORY, ...). `format` says what `idHex` holds: only `epc` is accepted. `peakRssi` is dBm.
* **Impinj IoT device interface** (R700; `parse_impinj`): one event or an array of them (the
  webhook posts arrays, the MQTT and stream outputs one event each), `{"timestamp",
  "hostname"?, "eventType"?, "tagInventoryEvent": {"epc" (base64) or "epcHex", "tid"/"tidHex"?,
  "antennaPort"?, "peakRssiCdbm"?, ...}}`. Other events (inventory status, GPI, keepalives) are
  counted as `skipped`, not refused. `peakRssiCdbm` is centi-dBm.

Fields the vendors add across firmware versions are ignored, so an upgrade does not break
intake; the fields used are type-checked and a batch with any bad event is refused whole.
The USER memory bank, when the reader reports it (Zebra `USER`), is kept as raw hex: its
ATA Spec 2000 Chapter 9-5 record layout is not public, so it is not decoded. Impinj's
memory-bank read results are not taken: no published example of their event shape was found.
An ADI-var EPC is decoded into `part` (`services.devices.epc`); any other EPC is kept raw with
`epc_scheme: "other"` (not an aviation part tag).
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


class _Collector:
    """Collects FieldErrors while the fields of one payload are read."""

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


def _events(payload: bytes, source: str) -> tuple[list[tuple[str, Any]], Malformed | None]:
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


def _rssi(value: Any, path: str, collect: _Collector, scale: int) -> Decimal | None:
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


def _with_part(read: TagRead) -> TagRead:
    """`read` with its EPC decoded when it is an ADI-var aviation part tag."""
    if not is_adi_var(read.epc_hex):
        return read
    decoded = decode_adi_var(read.epc_hex)
    if isinstance(decoded, AviationPart):
        return msgspec.structs.replace(read, epc_scheme="adi-var", part=decoded)
    return msgspec.structs.replace(read, epc_scheme="adi-var", part_errors=decoded)


def _zebra_read(path: str, event: Any, collect: _Collector) -> TagRead | None:
    obj = collect.object(event, path)
    if obj is None:
        return None
    before = len(collect.errors)
    read_at = collect.timestamp(obj, "timestamp", path)
    collect.text(obj, "type", path)
    data = collect.object(obj.get("data"), f"{path}.data") if "data" in obj else None
    if "data" not in obj:
        collect.fail(f"{path}.data", "required", "object", missing=True)
    if data is None:
        return None
    dpath = f"{path}.data"
    epc = collect.hex_field(data, "idHex", dpath, MAX_EPC_HEX, required=True)
    kind = collect.text(data, "format", dpath)
    if kind is not None and kind.lower() != "epc":
        collect.fail(f"{dpath}.format", "zebra.format", '"epc" (idHex holds the EPC)', kind)
    antenna = collect.integer(data, "antenna", dpath, 1, 255)
    rssi = _rssi(data["peakRssi"], f"{dpath}.peakRssi", collect, 1) if "peakRssi" in data else None
    reads = collect.integer(data, "reads", dpath, 0, 2**31 - 1)
    tid = collect.hex_field(data, "TID", dpath, MAX_BANK_HEX)
    user = collect.hex_field(data, "USER", dpath, MAX_BANK_HEX)
    if len(collect.errors) > before or epc is None or read_at is None:
        return None
    return _with_part(TagRead(reader_kind="zebra_iotc", reader_id=None, epc_hex=epc, antenna=antenna,
                              rssi_dbm=rssi, read_at=read_at, tid_hex=tid, user_hex=user, reads=reads))


def parse_zebra(payload: bytes) -> TagReads | Malformed:
    """A Zebra IoT Connector data event (or array of them) as tag reads, or every problem in it."""
    events, refused = _events(payload, "zebra")
    if refused is not None:
        return refused
    collect = _Collector()
    reads = [read for path, event in events if (read := _zebra_read(path, event, collect)) is not None]
    if collect.errors:
        return Malformed("zebra", collect.errors)
    return TagReads(reads=reads)


def _bank(obj: dict, key: str, path: str, collect: _Collector, limit: int, *, required: bool = False) -> str | None:
    """A memory bank given as `<key>Hex` and/or base64 `<key>`; both, when given, must agree."""
    as_hex = collect.hex_field(obj, f"{key}Hex", path, limit)
    as_b64 = collect.base64_field(obj, key, path, limit)
    if as_hex is not None and as_b64 is not None and as_hex != as_b64:
        collect.fail(f"{path}.{key}", "impinj.mismatch", f"the same bytes as {key}Hex", obj[key])
    if required and f"{key}Hex" not in obj and key not in obj:
        collect.fail(f"{path}.{key}Hex", "required", f"{key}Hex (hex) or {key} (base64)", missing=True)
    return as_hex or as_b64


def _impinj_read(path: str, event: Any, collect: _Collector) -> TagRead | None | bool:
    """The event's tag read; False when it is some other kind of event (not a read)."""
    obj = collect.object(event, path)
    if obj is None:
        return None
    kind = collect.text(obj, "eventType", path)
    if "tagInventoryEvent" not in obj:
        if kind == "tagInventory":
            collect.fail(f"{path}.tagInventoryEvent", "required", "object", missing=True)
            return None
        return False
    before = len(collect.errors)
    read_at = collect.timestamp(obj, "timestamp", path)
    host = collect.text(obj, "hostname", path)
    tpath = f"{path}.tagInventoryEvent"
    tag = collect.object(obj["tagInventoryEvent"], tpath)
    if tag is None:
        return None
    epc = _bank(tag, "epc", tpath, collect, MAX_EPC_HEX, required=True)
    tid = _bank(tag, "tid", tpath, collect, MAX_BANK_HEX)
    antenna = collect.integer(tag, "antennaPort", tpath, 1, 255)
    rssi = _rssi(tag["peakRssiCdbm"], f"{tpath}.peakRssiCdbm", collect, 100) if "peakRssiCdbm" in tag else None
    if len(collect.errors) > before or epc is None or read_at is None:
        return None
    return _with_part(TagRead(reader_kind="impinj_iot", reader_id=host, epc_hex=epc, antenna=antenna,
                              rssi_dbm=rssi, read_at=read_at, tid_hex=tid))


def parse_impinj(payload: bytes) -> TagReads | Malformed:
    """An Impinj IoT device interface event (or array of them) as tag reads, or every problem in it."""
    events, refused = _events(payload, "impinj")
    if refused is not None:
        return refused
    collect = _Collector()
    reads: list[TagRead] = []
    skipped = 0
    for path, event in events:
        read = _impinj_read(path, event, collect)
        if read is False:
            skipped += 1
        elif isinstance(read, TagRead):
            reads.append(read)
    if collect.errors:
        return Malformed("impinj", collect.errors)
    return TagReads(reads=reads, skipped=skipped)
