"""`schema_change` ledger entries: each activation, override and rollback goes to sign as one, so the
ledger says which contract judged every record after it (`mro.schema-change/1`)."""

from __future__ import annotations

import uuid
from typing import Any

import msgspec

from shared.compliance.versions import compile_version
from shared.contract import idempotency_key
from shared.runtime.clock import utc_now
from shared.runtime.messages import SERVICE_KIND, DeviceRef, SchemaChange, ValidatedRecord
from shared.runtime.work import UnitOfWork

CONTROL_DEVICE = DeviceRef(SERVICE_KIND, "validate")
_DRY_RUN_FIELDS = ("version", "sample", "failed", "failed_ppm", "tolerance_ppm", "by_rule", "by_field")


def schema_change_body(action: str, *, station: str, version: str, previous: str, command: dict,
                       definition: dict | None, dry_run: dict | None, reason: str | None,
                       withdrawn: str | None = None) -> dict[str, Any]:
    """The body of the entry: what changed, who asked, and the dry run that justified it."""
    body: dict[str, Any] = {
        "type": "schema_change",
        "event_id": str(uuid.uuid4()),
        "schema": "mro.schema-change/1",
        "station": station,
        "action": action,
        "version": version,
        "previous": previous,
        "at": utc_now(),
        "command_id": str(command.get("id") or "")[:64],
        "operator": str(command.get("operator") or "unknown")[:64],
    }
    if withdrawn:
        body["withdrawn"] = withdrawn
    if definition:
        body["definition"] = definition
        body["definition_sha256"] = compile_version(definition).sha256
    if dry_run:
        body["dry_run"] = {name: dry_run[name] for name in _DRY_RUN_FIELDS}
    if reason:
        body["reason"] = reason[:2000]
    return body


def forward_change(body: dict[str, Any], uow: UnitOfWork) -> str:
    """Send the entry downstream to sign in this batch; returns its event id."""
    key = idempotency_key(body)
    uow.forward(ValidatedRecord(key, msgspec.convert(body, SchemaChange), CONTROL_DEVICE))
    uow.note(body["event_id"], key, "SCHEMA_CHANGE_FORWARDED", action=body["action"])
    return body["event_id"]
