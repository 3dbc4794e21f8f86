"""Registry updates signed by the registry authority (the quality department, the CAMO).

A message on `mro/<station>/pipeline/registry` is

    {"update": {"serial": 7, "issued_at": "2026-11-23T10:00:00Z", "reason": "IA renewed",
                "technicians": {"upsert": [ {...entry...} ], "remove": ["1198305"]},
                "aircraft": {...}, "tools": {...}, "life_limited_parts": {...}},
     "kid": "<16 hex, optional>",
     "signature": "<base64 Ed25519 signature>"}

The signature is Ed25519 by the authority key over SHA-256 of the canonical JSON (RFC 8785,
`shared.ledger.canonical`) of `update`: the ledger's convention, so `openssl pkeyutl -verify -rawin`
checks it. `serial` must be greater than the last applied one, so an old update (say, the one
that once reinstated a technician since suspended) cannot be replayed. Every entry must be a
valid registry entry; anything wrong refuses the whole update, nothing is applied in part.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

import msgspec

from shared.compliance.registry import KINDS, RegistryError, convert_entry
from shared.ledger.canonical import CanonicalError, canonical_json
from shared.ledger.keys import SigningKey, key_id, verify_digest_signature


class UpdateRefused(Exception):
    """The update is not applied; the message says why (for the alarm and the log)."""


def update_digest_input(update: dict) -> bytes:
    """The bytes whose SHA-256 the authority signs."""
    return canonical_json(update)


def sign_update(update: dict, key: SigningKey) -> dict:
    """The message for `update` signed by the authority `key` (used by tools and tests)."""
    signature = key.sign_digest(update_digest_input(update))
    return {"update": update, "kid": key.kid, "signature": base64.b64encode(signature).decode("ascii")}


def verify_update(payload: bytes, authority_key: bytes | None, last_serial: int) -> dict:
    """The verified `update` of a registry message; UpdateRefused if anything is wrong."""
    if authority_key is None:
        raise UpdateRefused("no registry authority key is configured, so no update can be trusted "
                            "(set [compliance] authority_public_key)")
    try:
        message = msgspec.json.decode(payload)
    except msgspec.DecodeError as exc:
        raise UpdateRefused(f"not JSON: {str(exc)[:120]}") from None
    if not isinstance(message, dict) or not isinstance(message.get("update"), dict):
        raise UpdateRefused('expected {"update": {...}, "signature": "..."}')
    update, signature = message["update"], message.get("signature")
    if not isinstance(signature, str) or not signature:
        raise UpdateRefused("the update carries no signature")
    try:
        raw_signature = base64.b64decode(signature, validate=True)
    except (binascii.Error, ValueError):
        raise UpdateRefused("the signature is not base64") from None
    kid = message.get("kid")
    if kid is not None and kid != key_id(authority_key):
        raise UpdateRefused(f"signed with key {str(kid)[:20]!r}, not the configured authority key "
                            f"{key_id(authority_key)}")
    try:
        signed = update_digest_input(update)
    except CanonicalError as exc:
        raise UpdateRefused(f"the update is outside canonical JSON ({exc})") from None
    if not verify_digest_signature(authority_key, signed, raw_signature):
        raise UpdateRefused("the signature does not verify under the authority key")
    serial = update.get("serial")
    if type(serial) is not int or serial <= last_serial:
        raise UpdateRefused(f"serial {serial!r} is not greater than the last applied serial {last_serial} "
                            "(a replayed or out-of-order update)")
    check_changes(update)
    return update


def check_changes(update: dict) -> None:
    unknown = set(update) - {"serial", "issued_at", "reason", *KINDS}
    if unknown:
        raise UpdateRefused(f"unknown field(s) in the update: {', '.join(sorted(unknown))}")
    for name, (_, key_field) in KINDS.items():
        changes = update.get(name)
        if changes is None:
            continue
        if not isinstance(changes, dict) or set(changes) - {"upsert", "remove"}:
            raise UpdateRefused(f"{name}: expected {{upsert: [...], remove: [...]}}")
        for entry in changes.get("upsert", []):
            try:
                convert_entry(name, entry, f"update {name}")
            except RegistryError as exc:
                raise UpdateRefused(str(exc)) from None
            if not isinstance(entry.get(key_field), str):
                raise UpdateRefused(f"{name}: an upserted entry has no {key_field}")
        if not all(isinstance(k, str) for k in changes.get("remove", [])):
            raise UpdateRefused(f"{name}: remove must list {key_field} strings")


def apply_update(overlay: dict[str, Any] | None, update: dict) -> dict[str, Any]:
    """A new overlay: the old one with `update`'s upserts and removals (None) recorded."""
    new: dict[str, Any] = {name: dict((overlay or {}).get(name) or {}) for name in KINDS}
    for name, (_, key_field) in KINDS.items():
        changes = update.get(name) or {}
        for entry in changes.get("upsert", []):
            new[name][entry[key_field]] = entry
        for key in changes.get("remove", []):
            new[name][key] = None
    new["serial"] = update["serial"]
    return new
