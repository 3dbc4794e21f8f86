"""Work sessions and unassigned reads: ingest's tables, their one owner.

A work session is opened for a place on the hangar floor (`[places.<id>]` in edge.toml lists
the readers, scanners and controllers there) by `mro-edge session open`, which sends the
command on `mro/<st>/pipeline/sessions`; ingest handles it in its batch transaction, so
sessions and reads are seen in one order. At most one session is open per place.

`route` decides what a raw read becomes: a read naming a part at a place with an open
session becomes a contract record carrying the session's context (`services.ingest.reads`);
every other read is kept in the `unassigned` table (never dropped): no place configured for
the device, no open session there, or a read that names no part (`problem`). An unassigned
part read can be assigned to a session later (`mro-edge reads assign`); one with a problem
cannot (its fields would be guessed). One record per part per session: the `session_parts`
table remembers which parts a session has recorded, so a tag that stays in the field (or a
publish delivered twice) records once.

The bytes of every raw payload whose reads were recorded or kept are kept too (`keep_raw`, the
`raw_payloads` table, keyed by their SHA-256, which the record's `notes` name), in the same
transaction, so they are in ingest's store and its storage budget like everything it holds.

Opening and closing are ledger entries (`work_session_opened` / `work_session_closed`,
`shared.runtime.messages`), sent downstream as ingest's own (`SESSION_DEVICE`).
"""

from __future__ import annotations

import base64
import hashlib
import uuid
from collections.abc import Mapping
from typing import Any, Literal

import msgspec

from services.devices.profiles.registry import DEVICE_ROLE
from services.ingest.reads import RawRead
from shared.contract.types import Aircraft, AtaCode, Condition, RemovalReason, Technician, WorkOrderId
from shared.ledger.canonical import canonical_json
from shared.runtime.config import PlaceConfig
from shared.runtime.messages import SERVICE_KIND, DeviceRef, WorkSessionClosed, WorkSessionOpened, record_body
from shared.runtime.work import UnitOfWork

SESSIONS = "sessions"  # place -> WorkSessionOpened (JSON)
UNASSIGNED = "unassigned"  # read_id -> UnassignedRead (JSON)
SESSION_PARTS = "session_parts"  # session_id|cage|pn|serial -> b""
COMMANDS = "session_commands"  # command id -> the reply it got (a re-sent command is answered again)
# torque read id (controller, tightening id) -> the idempotency key of the record it made, or b""
# (kept unassigned or refused): a result the controller sends again is answered, never recorded twice
TORQUE_RESULTS = "torque_results"
# SHA-256 (hex) of a raw payload -> its bytes, as the device sent them: kept for every payload
# whose reads became records or were kept unassigned, so an auditor can fetch what a ledger
# entry's `notes` name (`mro-edge reads raw`); one row per distinct payload
RAW_PAYLOADS = "raw_payloads"
TABLES = (SESSIONS, UNASSIGNED, SESSION_PARTS, COMMANDS, TORQUE_RESULTS, RAW_PAYLOADS)
CHANGES = ("open", "close", "reads_assign")  # commands that change state: carried out once per id
SESSION_DEVICE = DeviceRef(SERVICE_KIND, "ingest")
SESSION_SCHEMA = "mro.work_session/1"
SESSIONS_NAMESPACE = uuid.UUID("0c5e2f7a-4b1d-5e93-8a6c-3f2d1e0b7c45")

Reason = Literal["no_place", "no_session", "framing_lost", "incomplete_mark", "not_a_part_tag",
                 "tool_calibration_unknown", "work_order_mismatch"]


class UnassignedRead(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A read kept because no session could take it; `place` is None when no place lists its device."""

    read: RawRead
    reason: Reason
    place: str | None = None

    @property
    def assignable(self) -> bool:
        return self.read.problem is None


class SessionError(Exception):
    """A session command that cannot be carried out; the message says what to do."""


_encode = msgspec.json.Encoder().encode
_session_decoder = msgspec.json.Decoder(WorkSessionOpened)
_unassigned_decoder = msgspec.json.Decoder(UnassignedRead)


def place_of(places: Mapping[str, PlaceConfig], device_kind: str, device_id: str) -> str | None:
    """The place whose configuration lists this device (the first, in name order)."""
    role = DEVICE_ROLE.get(device_kind)
    if role is None:
        return None
    for name in sorted(places):
        if device_id in getattr(places[name], role):
            return name
    return None


def route(place: str | None, sessions: Mapping[str, WorkSessionOpened], read: RawRead) -> WorkSessionOpened | Reason:
    """The session a read goes to, or why it is kept unassigned (pure)."""
    if read.problem is not None:
        return read.problem
    if place is None:
        return "no_place"
    session = sessions.get(place)
    return session if session is not None else "no_session"


def route_torque(place: str | None, sessions: Mapping[str, WorkSessionOpened],
                 read: RawRead, identifier: str) -> WorkSessionOpened | Reason:
    """The session a tightening goes to (pure). The controller's identifier field (where shops
    scan the work order) takes part: a result naming the work order of an open session goes to
    that session (the one at its place first); one naming another work order than the session at
    its place is kept (`work_order_mismatch`), never recorded against the wrong work order; an
    empty identifier leaves the place to decide, like any read."""
    if read.problem is not None:
        return read.problem
    if identifier:
        here = sessions.get(place) if place is not None else None
        if here is not None:
            return here if here.work_order_id == identifier else "work_order_mismatch"
        named = [s for s in sessions.values() if s.work_order_id == identifier]
        if len(named) == 1:
            return named[0]
    return route(place, sessions, read)


def torque_seen(uow: UnitOfWork, read_id: str) -> bytes | None:
    """What became of a tightening already handled: its record's key, b"" if none, None if new."""
    return uow.get(TORQUE_RESULTS, read_id.encode())


def remember_torque(uow: UnitOfWork, read_id: str, key: str = "") -> None:
    uow.put(TORQUE_RESULTS, read_id.encode(), key.encode())


# --- the tables ------------------------------------------------------------------------------

def open_sessions(uow: UnitOfWork) -> dict[str, WorkSessionOpened]:
    return {key.decode(): _session_decoder.decode(value) for key, value in uow.items(SESSIONS)}


def session_at(uow: UnitOfWork, place: str) -> WorkSessionOpened | None:
    raw = uow.get(SESSIONS, place.encode())
    return _session_decoder.decode(raw) if raw is not None else None


def keep_unassigned(uow: UnitOfWork, kept: UnassignedRead) -> bool:
    """Store the read unless it is already kept (a publish delivered twice); True if stored."""
    key = kept.read.read_id.encode()
    if uow.get(UNASSIGNED, key) is not None:
        return False
    uow.put(UNASSIGNED, key, _encode(kept))
    return True


def unassigned(uow: UnitOfWork) -> list[UnassignedRead]:
    return [_unassigned_decoder.decode(value) for _, value in uow.items(UNASSIGNED)]


def unassigned_count(uow: UnitOfWork) -> int:
    return len(uow.items(UNASSIGNED))


def take_unassigned(uow: UnitOfWork, read_id: str) -> UnassignedRead:
    raw = uow.get(UNASSIGNED, read_id.encode())
    if raw is None:
        raise SessionError(f"no unassigned read {read_id!r}: list them with `mro-edge reads list`")
    return _unassigned_decoder.decode(raw)


def drop_unassigned(uow: UnitOfWork, read_id: str) -> None:
    uow.delete(UNASSIGNED, read_id.encode())


def first_in_session(uow: UnitOfWork, session: WorkSessionOpened, read: RawRead) -> bool:
    """True the first time this session sees this part (and remember it); False after."""
    key = f"{session.session_id}|{read.part_key}".encode()
    if uow.get(SESSION_PARTS, key) is not None:
        return False
    uow.put(SESSION_PARTS, key, b"")
    return True


def answered(uow: UnitOfWork, command_id: str) -> dict[str, Any] | None:
    """The reply a state-changing command already got, if it was carried out."""
    raw = uow.get(COMMANDS, command_id.encode())
    return msgspec.json.decode(raw) if raw is not None else None


def remember(uow: UnitOfWork, command_id: str, reply: dict[str, Any]) -> None:
    uow.put(COMMANDS, command_id.encode(), _encode(reply))


def keep_raw(uow: UnitOfWork, payload: bytes) -> str:
    """Keep a device's payload under its SHA-256 (once: the same bytes again store nothing)."""
    digest = hashlib.sha256(payload).hexdigest()
    if uow.get(RAW_PAYLOADS, digest.encode()) is None:
        uow.put(RAW_PAYLOADS, digest.encode(), payload)
    return digest


def raw_reply(uow: UnitOfWork, digest: Any) -> dict[str, Any]:
    """The answer to `mro-edge reads raw SHA256`: the payload's bytes (base64), or why not."""
    text = str(digest).lower()
    if len(text) != 64 or any(c not in "0123456789abcdef" for c in text):
        raise SessionError("sha256 must be 64 hexadecimal digits, as a ledger entry's notes name it")
    payload = uow.get(RAW_PAYLOADS, text.encode())
    if payload is None:
        raise SessionError(f"no raw payload with sha256 {text}: ingest keeps the payloads whose reads became "
                           "records or were kept unassigned on this box")
    return {"ok": True, "sha256": text, "bytes": len(payload), "base64": base64.b64encode(payload).decode()}


# --- opening and closing ---------------------------------------------------------------------

def _checked(value: Any, kind: Any, what: str) -> Any:
    try:
        return msgspec.convert(value, kind)
    except msgspec.ValidationError as exc:
        raise SessionError(f"{what}: {exc}") from None


def opened_entry(command: dict[str, Any], *, station: str, places: Mapping[str, PlaceConfig], at: str,
                 operator: str) -> WorkSessionOpened:
    """The `work_session_opened` entry of an `open` command, its context checked against the
    device contract (the records made within the session carry it)."""
    place = str(command.get("place", ""))
    if place not in places:
        known = ", ".join(sorted(places)) or "none: add [places.<id>] sections to edge.toml"
        raise SessionError(f"unknown place {place[:40]!r}; configured places: {known}")
    action = command.get("part_action")
    if action not in ("receive", "install", "remove"):
        raise SessionError("part_action must be receive, install or remove")
    aircraft = _checked(command.get("aircraft"), Aircraft, "aircraft")
    technician = _checked(command.get("technician"), Technician, "technician")
    removal_reason = command.get("removal_reason")
    if action == "remove":
        removal_reason = _checked(removal_reason, RemovalReason, "removal_reason (required to remove)")
    elif removal_reason is not None:
        raise SessionError("removal_reason is only for part_action remove")
    default_condition = "UNSERVICEABLE" if action == "remove" else "SERVICEABLE"
    position = command.get("position")
    if position is not None and (not isinstance(position, str) or not 0 < len(position) <= 40
                                 or not position.isprintable()):
        raise SessionError("position must be 1-40 printable characters")
    command_id = str(command.get("id", ""))
    return WorkSessionOpened(
        schema=SESSION_SCHEMA,
        event_id=str(uuid.uuid5(SESSIONS_NAMESPACE, f"open|{command_id}")),
        station=station,
        session_id=str(uuid.uuid5(SESSIONS_NAMESPACE, f"session|{command_id}")),
        place=place,
        work_order_id=_checked(command.get("work_order_id"), WorkOrderId, "work_order_id"),
        at=at,
        command_id=command_id,
        operator=operator,
        aircraft={k: v for k, v in msgspec.to_builtins(aircraft).items()},
        ata=_checked(command.get("ata"), AtaCode, "ata"),
        technician={k: v for k, v in msgspec.to_builtins(technician).items()},
        part_action=action,
        condition=_checked(command.get("condition", default_condition), Condition, "condition"),
        position=position,
        removal_reason=removal_reason,
    )


def closed_entry(session: WorkSessionOpened, *, at: str, command_id: str, operator: str,
                 records: int) -> WorkSessionClosed:
    return WorkSessionClosed(
        schema=SESSION_SCHEMA,
        event_id=str(uuid.uuid5(SESSIONS_NAMESPACE, f"close|{command_id}")),
        station=session.station, session_id=session.session_id, place=session.place,
        work_order_id=session.work_order_id, at=at, command_id=command_id, operator=operator, records=records,
    )


def entry_key(entry: WorkSessionOpened | WorkSessionClosed) -> str:
    """Idempotency key of a session entry: the hash of its canonical body, like a record's."""
    return hashlib.sha256(canonical_json(record_body(entry))).hexdigest()


def store_open(uow: UnitOfWork, entry: WorkSessionOpened) -> None:
    current = session_at(uow, entry.place)
    if current is not None:
        raise SessionError(f"place {entry.place} already has session {current.session_id} open "
                           f"(work order {current.work_order_id}): close it first "
                           f"(mro-edge session close --place {entry.place})")
    uow.put(SESSIONS, entry.place.encode(), _encode(entry))


def store_close(uow: UnitOfWork, place: str) -> tuple[WorkSessionOpened, int]:
    """Close the session at `place`; (the session, how many parts it recorded)."""
    session = session_at(uow, place)
    if session is None:
        raise SessionError(f"no session is open at place {place[:40]!r}: see `mro-edge session list`")
    uow.delete(SESSIONS, place.encode())
    parts = uow.items(SESSION_PARTS, f"{session.session_id}|".encode())
    for key, _ in parts:
        uow.delete(SESSION_PARTS, key)
    return session, len(parts)
