"""`decode_record`: everything about a device message that can be judged from the message alone.

Valid records take one msgspec typed decode, a re-encode to count colons (duplicate keys,
`shared.contract.hygiene`) and a topic comparison. Anything msgspec refuses is diagnosed again
on the slow path (UTF-8, nesting, JSON syntax, duplicate keys, then every field error), which
costs more but only for records that are rejected anyway.
"""

from __future__ import annotations

import re
from decimal import Decimal

import msgspec

from shared.contract.errors import ContractError, FieldError, cut
from shared.contract.hygiene import DUPLICATE_EXPECTED, colons_differ, duplicate_keys
from shared.contract.scalars import enc_hook, wire_hook
from shared.contract.schema import MAX_ERRORS, collect_errors, json_path, readable_event_id, topic_errors
from shared.contract.types import Record

_typed = msgspec.json.Decoder(Record, dec_hook=wire_hook, float_hook=Decimal)
_untyped = msgspec.json.Decoder(float_hook=Decimal)
_reencode = msgspec.json.Encoder(enc_hook=enc_hook).encode

_STRING = re.compile(rb'"(?:[^"\\]++|\\.)*+"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_MSGSPEC_PATH = re.compile(r" - at `(\$[^`]*)`$")


def decode_record(payload: bytes, *, station: str, device_kind: str, device_id: str, max_bytes: int = 65536,
                  max_depth: int = 16, check_duplicates: bool = True) -> Record:
    """The record in `payload`, published on `mro/<station>/in/<device_kind>/<device_id>`.

    Raises ContractError listing every problem found. Size and nesting are checked before any
    decoding, so an oversized message or a nesting bomb costs no more than a scan of its bytes.
    `check_duplicates=False` only exists so the bench can price the duplicate-key check.
    """
    if len(payload) > max_bytes:
        raise ContractError([FieldError("$", "max_size", f"at most {max_bytes} bytes",
                                        f"{len(payload)} bytes")])
    if _depth_exceeds(payload, max_depth):
        raise ContractError([FieldError("$", "max_depth", f"JSON nested at most {max_depth} levels deep",
                                        f"deeper than {max_depth}")])
    try:
        record = _typed.decode(payload)
    except (msgspec.ValidationError, msgspec.DecodeError, UnicodeDecodeError) as exc:
        obj, errors = _diagnose(payload, station, device_kind, device_id, exc)
        raise ContractError(errors, readable_event_id(obj)) from None
    if check_duplicates and colons_differ(payload, _reencode(record)):
        duplicates = duplicate_errors(payload)
        if duplicates:
            raise ContractError(duplicates, record.event_id)
    if record.station != station or record.device.kind != device_kind or record.device.id != device_id:
        errors = topic_errors(record.station, record.device.kind, record.device.id,
                              station=station, device_kind=device_kind, device_id=device_id)
        raise ContractError(errors, record.event_id)
    return record


def peek_event_id(payload: bytes, *, max_bytes: int = 65536, max_depth: int = 16) -> str | None:
    """The event_id of a message that will not be decoded in full (a rate-limited one), so its
    `rejected` receipt can still name it; None when it has no well-formed one. Costs one
    untyped decode at most, and nothing for an oversized message or a nesting bomb."""
    if len(payload) > max_bytes or _depth_exceeds(payload, max_depth):
        return None
    try:
        return readable_event_id(_untyped.decode(payload))
    except (msgspec.DecodeError, UnicodeDecodeError):
        return None


def _diagnose(payload: bytes, station: str, device_kind: str, device_id: str,
              cause: Exception) -> tuple[object, list[FieldError]]:
    """(decoded object or None, every error) for a payload the fast path refused."""
    try:
        payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, [FieldError("$", "utf8", "UTF-8 encoded JSON",
                                 f"byte 0x{payload[exc.start]:02x} at offset {exc.start}")]
    try:
        obj = _untyped.decode(payload)
    except msgspec.DecodeError as exc:
        return None, [FieldError("$", "json", "one JSON object (RFC 8259)", cut(str(exc)))]
    errors = duplicate_errors(payload)
    errors += collect_errors(obj, station=station, device_kind=device_kind, device_id=device_id)
    errors = errors[:MAX_ERRORS]
    if not errors:
        errors = [from_msgspec(cause)]
    return obj, errors


def duplicate_errors(payload: bytes) -> list[FieldError]:
    """One `duplicate_key` error per repeated key, at its path (the second and later copies).

    Only called on what msgspec has parsed; should Python's parser still disagree, the message
    is refused as JSON rather than left to raise in the stage (which would count as poison)."""
    try:
        found = duplicate_keys(payload, MAX_ERRORS)
    except (ValueError, RecursionError):
        return [FieldError("$", "json", "one JSON object (RFC 8259)", "not readable as strict JSON")]
    return [FieldError(json_path(steps), "duplicate_key", DUPLICATE_EXPECTED, "the key again") for steps in found]


def from_msgspec(cause: Exception) -> FieldError:
    """msgspec refused what the collector passed; report msgspec's words rather than nothing."""
    message = str(cause)
    match = _MSGSPEC_PATH.search(message)
    path = match.group(1) if match else "$"
    text = message[: match.start()] if match else message
    return FieldError(path, "contract", cut(text), None)


def _depth_exceeds(payload: bytes, max_depth: int) -> bool:
    """Whether JSON nesting goes deeper than `max_depth`, judged on the raw bytes.

    Fewer opening brackets than the limit (every valid record) settles it at once; otherwise
    strings are cut out and the brackets counted, stopping at the first level too deep.
    """
    if payload.count(b"{") + payload.count(b"[") <= max_depth:
        return False
    depth = 0
    for bracket in _STRING.sub(b"", payload).translate(None, _NOT_BRACKETS):
        if bracket in b"[{":
            depth += 1
            if depth > max_depth:
                return True
        else:
            depth -= 1
    return False
