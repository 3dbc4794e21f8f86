"""Zebra IoT Connector tag data events (FX7500, FX9600, ATR7000) parsed into `TagRead`s.

One event object or an array of them, `{"data": {"idHex", "antenna"?, "peakRssi"?, "reads"?,
"format"?, "TID"?, "USER"?, "eventNum"?, "userDefined"?, ...}, "timestamp", "type"}`.
`timestamp` carries the reader's offset, e.g. `2024-09-05T01:07:01.785-0600`; `type` is the
operating mode (SIMPLE, CUSTOM, INVENTORY, ...). `format` says what `idHex` holds: only `epc` is
accepted. `peakRssi` is dBm. The USER memory bank, when reported, is kept as raw hex: its ATA
Spec 2000 Chapter 9-5 record layout is not public, so it is not decoded.
"""

from __future__ import annotations

from typing import Any

from services.devices.malformed import Malformed
from services.devices.rfid import (
    MAX_BANK_HEX,
    MAX_EPC_HEX,
    Collector,
    TagRead,
    TagReads,
    events_of,
    rssi_of,
    with_part,
)


def _zebra_read(path: str, event: Any, collect: Collector) -> TagRead | None:
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
    rssi = rssi_of(data["peakRssi"], f"{dpath}.peakRssi", collect, 1) if "peakRssi" in data else None
    reads = collect.integer(data, "reads", dpath, 0, 2**31 - 1)
    tid = collect.hex_field(data, "TID", dpath, MAX_BANK_HEX)
    user = collect.hex_field(data, "USER", dpath, MAX_BANK_HEX)
    if len(collect.errors) > before or epc is None or read_at is None:
        return None
    return with_part(TagRead(reader_kind="zebra_iotc", reader_id=None, epc_hex=epc, antenna=antenna,
                              rssi_dbm=rssi, read_at=read_at, tid_hex=tid, user_hex=user, reads=reads))


def parse_zebra(payload: bytes) -> TagReads | Malformed:
    """A Zebra IoT Connector data event (or array of them) as tag reads, or every problem in it."""
    events, refused = events_of(payload, "zebra")
    if refused is not None:
        return refused
    collect = Collector()
    reads = [read for path, event in events if (read := _zebra_read(path, event, collect)) is not None]
    if collect.errors:
        return Malformed("zebra", collect.errors)
    return TagReads(reads=reads)


