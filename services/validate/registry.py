"""Authority-signed registry updates (`mro/<station>/pipeline/registry`, `shared.compliance.updates`).

An accepted update is merged into the overlay kept in this stage's LMDB (`compliance` table:
`registry/overlay`, `registry/serial`) in the batch transaction, in force from the next record
on. A refused one raises an alarm and leaves the registry as it was. Either way the sender gets
a reply on `registry_reply(id)` if the message carried an id.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import msgspec

from shared.compliance import RegistryError, RegistrySource
from shared.compliance.registry import Registry, merge
from shared.compliance.updates import UpdateRefused, apply_update, verify_update
from shared.ledger.keys import KeyFormatError, public_key_from_pem
from shared.runtime.messages import json_encode
from shared.runtime.store import from_u64, u64
from shared.runtime.work import UnitOfWork

CONTROL_TABLE = "compliance"
_OVERLAY = b"registry/overlay"
_SERIAL = b"registry/serial"
_REGISTRY_NAMES = ("technicians", "aircraft", "tools", "life_limited_parts")

Alarm = Callable[[UnitOfWork, str, str], None]
Reader = Callable[[str, bytes], bytes | None]


def read_overlay(get: Reader) -> dict | None:
    """The stored overlay (None before the first accepted update); `get(table, key)` reads the store."""
    raw = get(CONTROL_TABLE, _OVERLAY)
    return msgspec.json.decode(raw) if raw else None


def read_serial(get: Reader) -> int:
    """The serial of the last accepted update (0 before the first)."""
    raw = get(CONTROL_TABLE, _SERIAL)
    return from_u64(raw) if raw else 0


class RegistryUpdates:
    """Verifies, applies and answers registry updates; the registry in force comes from `source`."""

    def __init__(self, source: RegistrySource, authority_key_path: Path | str, alarm: Alarm):
        self.source = source
        self.authority_key_path = Path(authority_key_path)
        self.alarm = alarm

    def apply(self, payload: bytes, uow: UnitOfWork) -> Registry | None:
        """The registry now in force, or None if the update was refused."""
        reply_topic = _reply_topic(payload, uow)
        try:
            update = verify_update(payload, self._authority_key(), read_serial(uow.get))
            overlay = apply_update(read_overlay(uow.get), update)
            registry = Registry.build(merge(self.source.files, overlay))
        except (UpdateRefused, RegistryError) as exc:
            self.alarm(uow, "registry_update_refused", str(exc))
            if reply_topic:
                uow.publish(reply_topic, json_encode({"ok": False, "message": str(exc)[:500]}))
            return None
        serial = update["serial"]
        if reply_topic:
            uow.publish(reply_topic, json_encode({"ok": True, "message": f"registry update {serial} "
                                                  f"in force (registry {registry.digest[:12]})"}))
        uow.put(CONTROL_TABLE, _OVERLAY, json_encode(overlay))
        uow.put(CONTROL_TABLE, _SERIAL, u64(serial))
        self.source.adopt(registry, serial)
        uow.note(None, None, "REGISTRY_UPDATED", serial=serial, changes=_change_counts(update))
        return registry

    def _authority_key(self) -> bytes | None:
        """The authority's public key; None if none is installed (verify_update then refuses)."""
        path = self.authority_key_path
        try:
            return public_key_from_pem(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, KeyFormatError, UnicodeDecodeError) as exc:
            raise UpdateRefused(f"the authority key {path} is unreadable: {exc}") from None


def _reply_topic(payload: bytes, uow: UnitOfWork) -> str | None:
    try:
        reply_id = msgspec.json.decode(payload).get("id")
    except (msgspec.DecodeError, AttributeError):
        return None
    return uow.topics.registry_reply(str(reply_id)[:64]) if reply_id else None


def _change_counts(update: dict) -> dict[str, int]:
    """Upserts plus removals per registry the update touches (for the log)."""
    counts = {}
    for name in _REGISTRY_NAMES:
        changes = update.get(name)
        if changes:
            counts[name] = len(changes.get("upsert", [])) + len(changes.get("remove", []))
    return counts
