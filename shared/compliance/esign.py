"""Technician e-signatures (FAA AC 120-78A: unique to the person, under their sole control,
bound to the record).

A signature is Ed25519, by the key registered for the technician, over SHA-256 of the
canonical JSON (RFC 8785) of the record's stored body without `event_id` and without the
signature fields (`technician.signature`, `inspector.signature`): the content of the record,
exactly what its idempotency key covers. A technician and an inspector sign the same bytes,
each with their own key, so either signature can be checked alone. `signature` holds the 64
signature bytes in base64.

Leaving `event_id` out keeps the contract's promise that the same content under a new
event_id is the same record: a re-sent copy must not turn into an invalid one.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from typing import Any

from shared.ledger.canonical import canonical_json
from shared.ledger.keys import SigningKey, verify_digest_signature

SIGNED_BLOCKS = ("technician", "inspector")


def signing_input(body: dict[str, Any]) -> bytes:
    """The bytes whose SHA-256 a technician signs, from a normalized body."""
    content = {}
    for name, value in body.items():
        if name == "event_id":
            continue
        if name in SIGNED_BLOCKS and type(value) is dict and "signature" in value:
            value = {k: v for k, v in value.items() if k != "signature"}
        content[name] = value
    return canonical_json(content)


def sign_body(body: dict[str, Any], key: SigningKey) -> str:
    """base64 signature of `body` (normalized) by `key`."""
    return base64.b64encode(key.sign_digest(signing_input(body))).decode("ascii")


def decode_signature(text: str) -> bytes | None:
    """The 64 signature bytes, or None if `text` is not base64 of exactly 64 bytes."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw if len(raw) == 64 else None


def verify(public_key: bytes, signed: bytes, signature: bytes) -> bool:
    return verify_digest_signature(public_key, signed, signature)


def simulator_seed(cert_no: str) -> bytes:
    """The key seed of a SIMULATOR-fleet technician: derived from public text, so anyone can
    forge these signatures. Only the simulator and the tests use it; see config/registries/README.md."""
    return hashlib.sha256(b"mro-edge simulator technician key/" + cert_no.encode()).digest()
