"""Impinj IoT device interface events (R700) parsed into `TagRead`s.

One event or an array of them (the webhook posts arrays, the MQTT and stream outputs one event
each), `{"timestamp", "hostname"?, "eventType"?, "tagInventoryEvent": {"epc" (base64) or
"epcHex", "tid"/"tidHex"?, "antennaPort"?, "peakRssiCdbm"?, ...}}`. Other events (inventory
status, GPI, keepalives) are counted as `skipped`, not refused. `peakRssiCdbm` is centi-dBm.
Memory-bank read results are not taken: no published example of their event shape was found.
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


def _bank(obj: dict, key: str, path: str, collect: Collector, limit: int, *, required: bool = False) -> str | None:
    """A memory bank given as `<key>Hex` and/or base64 `<key>`; both, when given, must agree."""
    as_hex = collect.hex_field(obj, f"{key}Hex", path, limit)
    as_b64 = collect.base64_field(obj, key, path, limit)
    if as_hex is not None and as_b64 is not None and as_hex != as_b64:
        collect.fail(f"{path}.{key}", "impinj.mismatch", f"the same bytes as {key}Hex", obj[key])
    if required and f"{key}Hex" not in obj and key not in obj:
        collect.fail(f"{path}.{key}Hex", "required", f"{key}Hex (hex) or {key} (base64)", missing=True)
    return as_hex or as_b64


def _impinj_read(path: str, event: Any, collect: Collector) -> TagRead | None | bool:
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
    rssi = rssi_of(tag["peakRssiCdbm"], f"{tpath}.peakRssiCdbm", collect, 100) if "peakRssiCdbm" in tag else None
    if len(collect.errors) > before or epc is None or read_at is None:
        return None
    return with_part(TagRead(reader_kind="impinj_iot", reader_id=host, epc_hex=epc, antenna=antenna,
                              rssi_dbm=rssi, read_at=read_at, tid_hex=tid))


def parse_impinj(payload: bytes) -> TagReads | Malformed:
    """An Impinj IoT device interface event (or array of them) as tag reads, or every problem in it."""
    events, refused = events_of(payload, "impinj")
    if refused is not None:
        return refused
    collect = Collector()
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
