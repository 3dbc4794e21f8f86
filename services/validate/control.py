"""The validate stage's control plane: registries in force, contract versions and the
schema-drift circuit breaker.

Two services-only topics (ACL: only the service user may use `mro/<station>/pipeline/#`):

- `mro/<station>/pipeline/registry`: authority-signed registry updates
  (`shared.compliance.updates`). Accepted: applied atomically to the overlay in this stage's
  LMDB, in force from the next record on. Refused: an alarm on `mro/<station>/alarm`.
- `mro/<station>/pipeline/schema`: commands from `mro-edge schema ...`
  `{"command": "stage"|"dry-run"|"activate"|"rollback"|"status", "id", "sent_at", ...}`; the
  answer goes to `mro/<station>/pipeline/schema/reply/<id>` after the commit. Commands older
  than `COMMAND_TTL_S` are refused (a command queued while the stage was down must not fire
  hours later).

Staging a version runs a dry run at once: the staged delta is replayed over the last N
records of the signed ledger (read-only, MVCC: safe beside the running sign service). Above
the tolerance the breaker opens: torque events and part receipts (non-critical writes) are
held in this stage's LMDB, neither rejected nor forwarded, while sign-offs keep flowing under
the active version. `activate` refuses above the tolerance; `activate --override --reason` or
`rollback` closes the breaker and releases the held records, judged under whatever version is
then active. Each activation, override and rollback is forwarded to sign as a ledger entry of
type `schema_change`, so the ledger says which contract judged every record after it.

All of this state lives in one LMDB value (`schema/state`), written in the batch transaction
and re-read whenever it differs from the cached bytes, so memory never runs ahead of what
committed.
"""

from __future__ import annotations

import os
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import lmdb
import msgspec

from shared.compliance import Compliance, RegistryError, RegistrySource
from shared.compliance.registry import Registry, merge
from shared.compliance.settings import compliance_settings
from shared.compliance.updates import UpdateRefused, apply_update, verify_update
from shared.compliance.versions import BASE, ContractVersion, DefinitionError, compile_version, dry_run
from shared.contract import RECORD_TYPES, idempotency_key
from shared.contract.scalars import stored_hook
from shared.ledger.keys import KeyFormatError, public_key_from_pem
from shared.runtime.alarms import alarm_payload
from shared.runtime.clock import utc_now
from shared.runtime.logs import get_logger
from shared.runtime.messages import (
    SERVICE_KIND,
    DeviceRef,
    ReceivedRecord,
    SchemaChange,
    ValidatedRecord,
    item_encoder,
    json_encode,
)
from shared.runtime.poison import reject_poison
from shared.runtime.store import Store, StoreError, from_u64, u64

NON_CRITICAL = frozenset({"torque_event", "part_receipt"})
COMMAND_TTL_S = 300
CONTROL_DEVICE = DeviceRef(SERVICE_KIND, "validate")
TABLE = "compliance"
HELD_TABLE = "held"
_STATE = b"schema/state"
_OVERLAY = b"registry/overlay"
_SERIAL = b"registry/serial"
_RECORD_TYPES = frozenset(RECORD_TYPES)

_held_decoder = msgspec.json.Decoder(ReceivedRecord, dec_hook=stored_hook)


def schema_topic(topics) -> str:
    return f"{topics.root}/pipeline/schema"


def schema_reply_topic(topics, command_id: str) -> str:
    return f"{topics.root}/pipeline/schema/reply/{command_id}"


def registry_topic(topics) -> str:
    return f"{topics.root}/pipeline/registry"


def registry_reply_topic(topics, command_id: str) -> str:
    return f"{topics.root}/pipeline/registry/reply/{command_id}"


class SchemaState(msgspec.Struct, kw_only=True):
    active: dict | None = None  # definition of the active version; None = mro.record/1
    active_since: str | None = None
    history: list[dict] = msgspec.field(default_factory=list)  # earlier active definitions
    staged: dict | None = None
    staged_at: str | None = None
    dry_run: dict | None = None  # last DryRunReport of the staged version
    breaker: str = "closed"
    breaker_since: str | None = None
    breaker_reason: str | None = None
    held_first: int = 0
    held_next: int = 0

    @property
    def held(self) -> int:
        return self.held_next - self.held_first


_encode_state = msgspec.json.Encoder().encode
_decode_state = msgspec.json.Decoder(SchemaState).decode


class SchemaControl:
    def __init__(self, stage, config, store: Store):
        self.stage = stage
        self.config = config
        self.settings = compliance_settings(config)
        self.log = get_logger(stage=stage.name)
        with store.read() as txn:
            raw_state = txn.get(_STATE, db=store.table(TABLE))
            raw_overlay = txn.get(_OVERLAY, db=store.table(TABLE))
        overlay = msgspec.json.decode(raw_overlay) if raw_overlay else None
        self.source = RegistrySource(self.settings.registries_dir, self.settings.registry_check_s)
        registry = self.source.load(overlay)
        self._state_raw = raw_state
        self.state = _decode_state(raw_state) if raw_state else SchemaState()
        self._active_definition = self.state.active
        self._active = self._compile(self.state.active)
        self.compliance = Compliance(registry, self._active)
        self._registry_error: str | None = None

    @staticmethod
    def _compile(definition: dict | None) -> ContractVersion:
        return compile_version(definition) if definition else BASE

    # --- what is in force --------------------------------------------------------------------------

    @property
    def breaker_open(self) -> bool:
        return self.state.breaker == "open"

    def refresh(self, uow) -> None:
        """Bring the registry and the schema state in line with the committed state (cheap)."""
        raw_state = uow.get(TABLE, _STATE)
        if raw_state != self._state_raw:
            self._state_raw = raw_state
            self.state = _decode_state(raw_state) if raw_state else SchemaState()
            self._adopt_active()
        raw_serial = uow.get(TABLE, _SERIAL)
        serial = from_u64(raw_serial) if raw_serial else 0
        registry, error = self.source.current(serial, lambda: self._overlay(uow))
        if error and error != self._registry_error:
            self._alarm(uow, "registry_refused", f"registry change refused, previous registry stays: {error}")
        self._registry_error = error
        if registry is not self.compliance.registry or self._active is not self.compliance.version:
            self.compliance = Compliance(registry, self._active)

    def _overlay(self, uow) -> dict | None:
        raw = uow.get(TABLE, _OVERLAY)
        return msgspec.json.decode(raw) if raw else None

    def _save(self, uow, state: SchemaState) -> None:
        raw = _encode_state(state)
        uow.put(TABLE, _STATE, raw)
        self._state_raw, self.state = raw, state
        self._adopt_active()

    def _adopt_active(self) -> None:
        """Recompile the active version only when its definition changed."""
        if self.state.active != self._active_definition:
            self._active_definition = self.state.active
            self._active = self._compile(self.state.active)
            self.compliance = Compliance(self.compliance.registry, self._active)

    def status(self) -> dict[str, Any]:
        state = self.state
        out: dict[str, Any] = {"contract": self._active.version, "breaker": state.breaker, "held": state.held,
                               "registry": self.compliance.registry.digest[:12]}
        if state.staged:
            out["staged"] = state.staged.get("version")
        return out

    # --- held records ------------------------------------------------------------------------------

    def hold(self, item: ReceivedRecord, uow) -> None:
        state = msgspec.structs.replace(self.state, held_next=self.state.held_next + 1)
        uow.put(HELD_TABLE, u64(self.state.held_next), item_encoder.encode(item))
        self._save(uow, state)

    def _release(self, uow) -> int:
        """Judge every held record under the version now in force and settle it with its verdict."""
        state = self.state
        released = 0
        for held_id in range(state.held_first, state.held_next):
            raw = uow.get(HELD_TABLE, u64(held_id))
            if raw is None:
                continue
            item = _held_decoder.decode(raw)
            uow.delete(HELD_TABLE, u64(held_id))
            try:
                verdict = self.stage.judge(item, uow, may_hold=False)
            except Exception as exc:  # one broken record must not keep the others held
                reject_poison(uow, item, exc)
            else:
                uow.settle(item, verdict)
            released += 1
        self._save(uow, msgspec.structs.replace(self.state, held_first=state.held_next))
        return released

    # --- notices -----------------------------------------------------------------------------------

    def notice(self, topic: str, payload: bytes, uow) -> None:
        if topic == registry_topic(uow.topics):
            self._registry_update(payload, uow)
        elif topic == schema_topic(uow.topics):
            self._command(payload, uow)

    def _registry_update(self, payload: bytes, uow) -> None:
        raw_serial = uow.get(TABLE, _SERIAL)
        last = from_u64(raw_serial) if raw_serial else 0
        try:
            reply_id = msgspec.json.decode(payload).get("id")
        except (msgspec.DecodeError, AttributeError):
            reply_id = None
        reply_topic = registry_reply_topic(uow.topics, str(reply_id)[:64]) if reply_id else None
        try:
            update = verify_update(payload, self._authority_key(), last)
            overlay = apply_update(self._overlay(uow), update)
            registry = Registry.build(merge(self.source.files, overlay))
        except (UpdateRefused, RegistryError) as exc:
            self._alarm(uow, "registry_update_refused", str(exc))
            if reply_topic:
                uow.publish(reply_topic, json_encode({"ok": False, "message": str(exc)[:500]}))
            return
        if reply_topic:
            uow.publish(reply_topic, json_encode({"ok": True, "message": f"registry update {update['serial']} "
                                                  f"in force (registry {registry.digest[:12]})"}))
        uow.put(TABLE, _OVERLAY, json_encode(overlay))
        uow.put(TABLE, _SERIAL, u64(update["serial"]))
        self.source.adopt(registry, update["serial"])
        self.compliance = Compliance(registry, self._active)
        counts = {name: len(update[name].get("upsert", [])) + len(update[name].get("remove", []))
                  for name in ("technicians", "aircraft", "tools", "life_limited_parts") if update.get(name)}
        uow.note(None, None, "REGISTRY_UPDATED", serial=update["serial"], changes=counts)

    def _authority_key(self) -> bytes | None:
        path = self.settings.authority_public_key
        try:
            return public_key_from_pem(Path(path).read_text())
        except FileNotFoundError:
            return None
        except (OSError, KeyFormatError, UnicodeDecodeError) as exc:
            raise UpdateRefused(f"the authority key {path} is unreadable: {exc}") from None

    def _command(self, payload: bytes, uow) -> None:
        try:
            command = msgspec.json.decode(payload)
            if not isinstance(command, dict):
                raise ValueError("not an object")
        except (msgspec.DecodeError, ValueError):
            self.log.warning("unreadable schema command ignored")
            return
        command_id = str(command.get("id") or "")[:64] or uuid.uuid4().hex
        try:
            try:
                sent_at = datetime.fromisoformat(str(command.get("sent_at", "")).replace("Z", "+00:00"))
                age = abs((datetime.now(UTC) - sent_at).total_seconds())
            except (ValueError, TypeError):
                raise CommandError(f"sent_at {str(command.get('sent_at'))[:40]!r} is not an RFC 3339 UTC "
                                   "time") from None
            if age > COMMAND_TTL_S:
                raise CommandError(f"the command was sent at {command.get('sent_at')}, more than "
                                   f"{COMMAND_TTL_S} s ago; send it again")
            handler = _COMMANDS.get(str(command.get("command")))
            if handler is None:
                raise CommandError(f"unknown command {str(command.get('command'))[:40]!r}")
            reply = handler(self, command, uow)
            reply["ok"] = True
        except CommandError as exc:
            reply = {"ok": False, "message": str(exc)}
        reply["id"] = command_id
        reply["state"] = self._summary()
        uow.publish(schema_reply_topic(uow.topics, command_id), json_encode(reply))

    def _summary(self) -> dict[str, Any]:
        state = self.state
        return {
            "active": self._active.version,
            "active_title": self._active.title,
            "active_since": state.active_since,
            "staged": state.staged.get("version") if state.staged else None,
            "staged_title": state.staged.get("title") if state.staged else None,
            "dry_run": state.dry_run,
            "breaker": state.breaker,
            "breaker_since": state.breaker_since,
            "breaker_reason": state.breaker_reason,
            "held": state.held,
            "history": [d.get("version") for d in state.history],
            "tolerance_ppm": self.settings.tolerance_ppm,
        }

    # --- schema commands ---------------------------------------------------------------------------

    def cmd_status(self, command, uow) -> dict:
        return {"message": "status"}

    def cmd_stage(self, command, uow) -> dict:
        try:
            version = compile_version(command.get("definition"))
        except DefinitionError as exc:
            raise CommandError(f"cannot stage: {exc}") from None
        if version.number <= self._active.number:
            raise CommandError(f"cannot stage {version.version}: {self._active.version} is active; "
                               "a new version must have a higher number")
        state = msgspec.structs.replace(self.state, staged=version.definition, staged_at=utc_now(), dry_run=None)
        self._save(uow, state)
        report = self._dry_run(version, command, uow)
        return {"message": f"staged {version.version}; {report['summary']}", "dry_run": report}

    def cmd_dry_run(self, command, uow) -> dict:
        version = self._staged()
        report = self._dry_run(version, command, uow)
        return {"message": report["summary"], "dry_run": report}

    def cmd_activate(self, command, uow) -> dict:
        version = self._staged()
        override = bool(command.get("override"))
        reason = str(command.get("reason") or "").strip()
        if override and not reason:
            raise CommandError("an override needs --reason: why the drift is acceptable, for the ledger")
        report = self._dry_run(version, command, uow)
        if not report["within_tolerance"] and not override:
            raise CommandError(f"activation refused: {report['summary']}. The breaker holds torque events "
                               "and part receipts; fix the devices and run dry-run again, roll back, or "
                               "activate --override --reason TEXT")
        state = self.state
        previous = self._active.version
        history = state.history + ([state.active] if state.active else [])
        action = "override" if override else "activate"
        body = self._ledger_entry(action, version=version.version, previous=previous, command=command,
                                  definition=version.definition, dry_run=report["report"], reason=reason or None)
        self._save(uow, msgspec.structs.replace(
            state, active=version.definition, active_since=utc_now(), history=history, staged=None,
            staged_at=None, dry_run=None, **_closed()))
        event_id = self._forward(body, uow)
        released = self._release(uow)
        self.log.warning("contract version activated", state_transition=f"SCHEMA_{action.upper()}",
                         version=version.version, previous=previous, released=released,
                         failed_ppm=report["report"]["failed_ppm"])
        return {"message": f"{version.version} is active ({action}); {released} held record(s) released",
                "ledger_event_id": event_id, "released": released, "dry_run": report}

    def cmd_rollback(self, command, uow) -> dict:
        state = self.state
        reason = str(command.get("reason") or "").strip() or None
        if state.staged:
            withdrawn = state.staged["version"]
            body = self._ledger_entry("rollback", version=self._active.version, previous=self._active.version,
                                      withdrawn=withdrawn, command=command, definition=state.staged,
                                      dry_run=state.dry_run, reason=reason)
            new = msgspec.structs.replace(state, staged=None, staged_at=None, dry_run=None, **_closed())
            message = f"withdrew staged {withdrawn}; {self._active.version} stays active"
        elif state.active:
            previous_definition = state.history[-1] if state.history else None
            target = self._compile(previous_definition).version
            withdrawn = self._active.version
            body = self._ledger_entry("rollback", version=target, previous=withdrawn, withdrawn=withdrawn,
                                      command=command, definition=state.active, dry_run=None, reason=reason)
            new = msgspec.structs.replace(state, active=previous_definition, active_since=utc_now(),
                                          history=state.history[:-1], **_closed())
            message = f"rolled back from {withdrawn} to {target}"
        else:
            raise CommandError(f"nothing to roll back: nothing is staged and {self._active.version} is the base")
        self._save(uow, new)
        event_id = self._forward(body, uow)
        released = self._release(uow)
        self.log.warning("contract version rolled back", state_transition="SCHEMA_ROLLBACK",
                         withdrawn=withdrawn, active=self._active.version, released=released)
        return {"message": f"{message}; {released} held record(s) released", "ledger_event_id": event_id,
                "released": released}

    def _staged(self) -> ContractVersion:
        if not self.state.staged:
            raise CommandError("nothing is staged: mro-edge schema stage FILE first")
        return compile_version(self.state.staged)

    def _dry_run(self, version: ContractVersion, command: dict, uow) -> dict:
        sample = command.get("sample")
        sample = sample if type(sample) is int and sample > 0 else self.settings.dry_run_sample
        started = time.perf_counter()
        report = dry_run(version, ledger_bodies(self.config, sample), tolerance_ppm=self.settings.tolerance_ppm)
        report.seconds_ms = round((time.perf_counter() - started) * 1000)
        report_dict = msgspec.to_builtins(report)
        state = msgspec.structs.replace(self.state, dry_run=report_dict)
        if not report.within_tolerance and state.breaker != "open":
            state = msgspec.structs.replace(state, breaker="open", breaker_since=utc_now(),
                                            breaker_reason=report.summary())
            self._alarm(uow, "schema_drift", f"{report.summary()}; breaker open: torque events and part "
                        "receipts are held until `mro-edge schema rollback` or an override")
            self.log.error("schema drift above tolerance; breaker open", state_transition="BREAKER_OPEN",
                           version=version.version, failed_ppm=report.failed_ppm, sample=report.sample)
        self._save(uow, state)
        return {"summary": report.summary(), "within_tolerance": report.within_tolerance, "report": report_dict}

    def _ledger_entry(self, action: str, *, version: str, previous: str, command: dict, definition: dict | None,
                      dry_run: dict | None, reason: str | None, withdrawn: str | None = None) -> dict:
        body: dict[str, Any] = {
            "type": "schema_change",
            "event_id": str(uuid.uuid4()),
            "schema": "mro.schema-change/1",
            "station": self.config.station,
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
            body["dry_run"] = {k: dry_run[k] for k in ("version", "sample", "failed", "failed_ppm", "tolerance_ppm",
                                                        "by_rule", "by_field")}
        if reason:
            body["reason"] = reason[:2000]
        return body

    def _forward(self, body: dict, uow) -> str:
        key = idempotency_key(body)
        uow.forward(ValidatedRecord(key, msgspec.convert(body, SchemaChange), CONTROL_DEVICE))
        uow.note(body["event_id"], key, "SCHEMA_CHANGE_FORWARDED", action=body["action"])
        return body["event_id"]

    def _alarm(self, uow, kind: str, detail: str) -> None:
        self.log.error("alarm", alarm=kind, detail=detail[:300], state_transition=f"ALARM_{kind.upper()}")
        uow.publish(uow.topics.alarm, alarm_payload(self.stage.name, kind, detail))


class CommandError(Exception):
    """A schema command that cannot be carried out; its text is the reply."""


def _closed() -> dict:
    return {"breaker": "closed", "breaker_since": utc_now(), "breaker_reason": None}


_COMMANDS = {
    "status": SchemaControl.cmd_status,
    "stage": SchemaControl.cmd_stage,
    "dry-run": SchemaControl.cmd_dry_run,
    "activate": SchemaControl.cmd_activate,
    "rollback": SchemaControl.cmd_rollback,
}


def ledger_bodies(config, limit: int):
    """The bodies of the last `limit` records in the signed ledger, newest first (read-only).

    Entries that are not device records (schema changes) are skipped and do not count."""
    from shared.ledger.store import LEDGER_TABLE, decode_entry, open_ledger

    try:
        store = open_ledger(config)
    except (StoreError, lmdb.Error):
        return
    try:
        try:
            table = store.table(LEDGER_TABLE)
        except KeyError:
            return
        with store.read() as txn:
            cursor = txn.cursor(db=table)
            if not cursor.last():
                return
            count = 0
            decode = msgspec.json.decode
            while count < limit:
                entry = decode(decode_entry(cursor.value()).entry)
                if entry.get("type") in _RECORD_TYPES:
                    yield entry["body"]
                    count += 1
                if not cursor.prev():
                    break
    finally:
        store.close()


def operator_name() -> str:
    return os.environ.get("SUDO_USER") or os.environ.get("USER") or os.environ.get("LOGNAME") or "unknown"
