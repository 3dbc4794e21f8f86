"""The stored form of a record: a JSON-safe body that is signed, hashed and kept.

A body has the input's field names, leaves absent optional fields absent, and writes every
value in one canonical spelling (quantities as plain decimal strings, timestamps with `Z`), so
the same content always gives the same bytes and thus the same idempotency key, however the
device spelt its numbers or ordered its keys.
"""

from __future__ import annotations

from typing import Any

import msgspec

from shared.contract.decode import from_msgspec
from shared.contract.errors import ContractError
from shared.contract.scalars import enc_hook, stored_hook
from shared.contract.schema import readable_event_id
from shared.contract.types import Record
from shared.ledger.canonical import canonical_json, sha256_hex


def normalize(record: Record) -> dict:
    """The canonical body of `record`, including `type` and `event_id`."""
    return msgspec.to_builtins(record, enc_hook=enc_hook)


def record_from_body(body: dict) -> Record:
    """The record a body stands for (inverse of `normalize`); ContractError if it is not one."""
    try:
        return msgspec.convert(body, Record, dec_hook=stored_hook)
    except msgspec.ValidationError as exc:
        raise ContractError([from_msgspec(exc)], readable_event_id(body)) from None


def idempotency_key(body: dict[str, Any]) -> str:
    """Hex SHA-256 of the canonical body without `event_id`: the same content under a new
    event_id is the same record, and any change of content is a different one."""
    return sha256_hex(canonical_json({key: value for key, value in body.items() if key != "event_id"}))
