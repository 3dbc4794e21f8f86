"""Ingest: turn a device publish into a durably held record, or a clear rejection.

`admit` first takes a token from the device's bucket (`ratelimit`): a device over its rate is
refused with rule `rate_limited`, answered and counted but not decoded or stored. Otherwise it
decodes the message against device contract v1 and derives the idempotency key from the
content; the runtime then drops re-sends (answering them with what became of the original)
and owes every new record to the validate stage, with its `received` receipt after the commit
(`shared.runtime.delivery`).

A raw hangar device (`RAW_DEVICE_KINDS`: RFID readers, part-mark scanners) publishes its
vendor's format instead: its reads are parsed (`services.ingest.reads`), repeated tag reads
within `[limits] read_window_s` count once, and each read becomes a contract record within the
open work session at the device's place, or is kept as an unassigned read in the same
transaction (`services.ingest.sessions`, which also handles the session commands).

Torque controllers reach ingest through the Open Protocol bridge (`services.torque.bridge`), one
`mro.op_result/1` per tightening on `in/torque_controller/<id>`. Each is answered with a device
receipt whatever becomes of it (`received` when made a record or kept unassigned, `rejected`
with its DLQ report, `duplicate` for a tightening already handled): the bridge acknowledges
the result to the controller (MID 0062) only on that receipt, sent after this commit.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

import msgspec

from services.devices.dedupe import ReadWindow
from services.devices.malformed import Malformed
from services.devices.rfid import TagRead
from services.ingest import sessions as book
from services.ingest.ratelimit import RateLimiter
from services.ingest.reads import (
    CONTRACT_KIND,
    RawRead,
    TorqueSource,
    reads_of,
    record_json,
    telegram_bytes,
    torque_read,
    torque_read_id,
)
from services.torque.telegram import KIND as TORQUE_KIND
from services.torque.telegram import decode_telegram, result_event_id
from shared.contract import ContractError, FieldError, decode_record, error_report, idempotency_key, normalize
from shared.contract.decode import peek_event_id
from shared.contract.types import UUID_PATTERN
from shared.runtime import delivery
from shared.runtime.alarms import alarm_payload
from shared.runtime.clock import utc_now
from shared.runtime.handler import DeviceMessage, IntakeStage
from shared.runtime.logs import get_logger
from shared.runtime.messages import DeviceReceipt, DeviceRef, FateQuery, ReceivedRecord, json_encode
from shared.runtime.topics import RAW_DEVICE_KINDS, Topics
from shared.runtime.verdicts import Accepted, Rejected, Verdict
from shared.runtime.work import UnitOfWork

# a device that stays over its rate is alarmed again after this long
RATE_ALARM_EVERY_S = 300.0


class Ingest(IntakeStage):
    name = "ingest"
    downstream = "validate"
    accepted_state = "RECEIVED"
    tables = book.TABLES

    def notice_topics(self, topics: Topics) -> tuple[str, ...]:
        return (topics.sessions,)

    def open(self, runtime) -> None:
        self.station = runtime.config.station
        self.limits = runtime.config.limits
        self.topics = runtime.topics
        self.limiter = RateLimiter(self.limits.device_rate_per_s, self.limits.device_burst)
        self._limited: set[str] = set()  # devices refused in the current batch
        self._alarmed: dict[str, float] = {}  # device id -> when its rate alarm was last raised
        self.places = runtime.config.places
        self.window = ReadWindow(self.limits.read_window_s)
        self._unassigned: int | None = None  # count, refreshed in every transaction that may change it
        store = getattr(runtime, "store", None)  # the service's; unit tests run without one
        if store is not None:
            with store.read() as txn:
                self._unassigned = txn.stat(store.table(book.UNASSIGNED))["entries"]

    def admit(self, message: DeviceMessage, uow: UnitOfWork) -> ReceivedRecord | list[ReceivedRecord] | Rejected:
        device_kind, device_id = self.topics.parse_device_in(message.topic) or ("", "")
        if not self.limiter.allow(device_id):
            self._limited.add(device_id)
            return self._rate_limited(message)
        if device_kind in RAW_DEVICE_KINDS:
            return self._raw(message, device_kind, device_id, uow)
        if device_kind == TORQUE_KIND:
            return self._torque(message, device_id, uow)
        if device_kind == "tablet" and (command := self._session_command(message.payload)) is not None:
            self._tablet(message, command, device_id, uow)
            return []
        try:
            record = decode_record(
                message.payload,
                station=self.station,
                device_kind=device_kind,
                device_id=device_id,
                max_bytes=self.limits.max_message_bytes,
                max_depth=self.limits.max_depth,
            )
        except ContractError as exc:
            return Rejected(error_report(
                stage=self.name,
                errors=exc.errors,
                received_at=message.received_at,
                event_id=exc.event_id,
                raw=message.payload,
                max_raw=self.limits.max_raw_in_report,
            ))
        key = idempotency_key(normalize(record))
        return ReceivedRecord(key, record, message.received_at, DeviceRef(device_kind, device_id))

    def _rate_limited(self, message: DeviceMessage) -> Rejected:
        """Refused unread: the receipt names the event_id when the message has a readable one,
        so the device knows which record to send again later."""
        rate, burst = self.limits.device_rate_per_s, self.limits.device_burst
        error = FieldError("$", "rate_limited",
                           f"at most {rate:g} messages/s from one device (bursts of up to {burst}); "
                           "send this record again later", f"{len(message.payload)} bytes, not read")
        event_id = peek_event_id(message.payload, max_bytes=self.limits.max_message_bytes,
                                 max_depth=self.limits.max_depth)
        return Rejected(error_report(stage=self.name, errors=[error], received_at=message.received_at,
                                     event_id=event_id), counted_only=True)

    # --- raw hangar devices --------------------------------------------------------------------

    def _raw(self, message: DeviceMessage, kind: str, device_id: str,
             uow: UnitOfWork) -> list[ReceivedRecord] | Rejected:
        """Each read of a raw publish: a record within the open session at the device's place,
        or an unassigned read kept in this transaction. Nothing a reader sent is dropped but a
        tag read repeating one within the read window."""
        if (refused := self._oversize(message)) is not None:
            return refused
        reads = reads_of(kind, device_id, message.payload, message.received_at)
        if isinstance(reads, Malformed):
            return Rejected(error_report(stage=self.name, errors=reads.errors, received_at=message.received_at,
                                         raw=message.payload, max_raw=self.limits.max_raw_in_report))
        place = book.place_of(self.places, kind, device_id)
        sessions = book.open_sessions(uow)
        records: list[ReceivedRecord] = []
        kept = False  # a read of this payload was recorded or kept: its bytes are kept too
        now = time.monotonic()
        for read in reads:
            # the read's id as token: a batch retried after a failed commit sees its reads again
            if isinstance(read.source, TagRead) and not self.window.admit(device_id, read.source.epc_hex, now,
                                                                           read.read_id):
                continue
            target = book.route(place, sessions, read)
            if isinstance(target, str):
                kept = self._keep(uow, book.UnassignedRead(read=read, reason=target, place=place)) or kept
            elif book.first_in_session(uow, target, read):
                made = self._made(target, read, message.received_at, uow)
                if made is not None:
                    records.append(made)
                    kept = True
            else:
                uow.note(None, None, "READ_REPEATED", read_id=read.read_id, session_id=target.session_id)
        if kept:
            book.keep_raw(uow, message.payload)
        return records

    def _oversize(self, message: DeviceMessage) -> Rejected | None:
        """A raw publish larger than `[limits] max_message_bytes` is refused unparsed."""
        if len(message.payload) <= self.limits.max_message_bytes:
            return None
        error = FieldError("$", "max_size", f"at most {self.limits.max_message_bytes} bytes",
                           f"{len(message.payload)} bytes")
        return Rejected(error_report(stage=self.name, errors=[error], received_at=message.received_at,
                                     raw=message.payload, max_raw=self.limits.max_raw_in_report))

    # --- torque controllers (through the Open Protocol bridge) ----------------------------------

    def _torque(self, message: DeviceMessage, controller_id: str,
                uow: UnitOfWork) -> list[ReceivedRecord] | Rejected:
        """One tightening result: a torque_event within the session its place and identifier
        name, or an unassigned read, or a DLQ report; once per (controller, tightening id)."""
        if (refused := self._oversize(message)) is not None:
            return refused
        try:
            sent = decode_telegram(message.payload)
        except msgspec.MsgspecError as exc:
            error = FieldError("$", "op_result", "an mro.op_result/1 object from the torque bridge", str(exc)[:80])
            return Rejected(error_report(stage=self.name, errors=[error], received_at=message.received_at,
                                         raw=message.payload, max_raw=self.limits.max_raw_in_report))
        event_id = result_event_id(controller_id, sent.telegram)
        read_id = torque_read_id(controller_id, sent.telegram)
        if (seen := book.torque_seen(uow, read_id)) is not None:
            self._torque_again(uow, controller_id, event_id, seen.decode())
            return []
        read = torque_read(controller_id, sent, message.received_at)
        if isinstance(read, list):
            book.remember_torque(uow, read_id)  # its report is kept in the DLQ, in this transaction
            return Rejected(error_report(stage=self.name, errors=read, received_at=message.received_at,
                                         event_id=event_id, raw=message.payload,
                                         max_raw=self.limits.max_raw_in_report))
        identifier = read.source.identifier if isinstance(read.source, TorqueSource) else ""
        place = book.place_of(self.places, TORQUE_KIND, controller_id)
        target = book.route_torque(place, book.open_sessions(uow), read, identifier)
        if isinstance(target, str):
            # refused when the unassigned store is full: no receipt names it, so it is not acknowledged
            if self._keep(uow, book.UnassignedRead(read=read, reason=target, place=place)):
                book.remember_torque(uow, read_id)
                book.keep_raw(uow, telegram_bytes(sent.telegram))
                delivery.receipt(uow, DeviceRef(TORQUE_KIND, controller_id),
                                 DeviceReceipt("received", utc_now(), event_id))
            return []
        book.first_in_session(uow, target, read)
        made = self._made(target, read, message.received_at, uow)
        book.remember_torque(uow, read_id, made.key if made is not None else "")
        if made is not None:
            book.keep_raw(uow, telegram_bytes(sent.telegram))
        return [made] if made is not None else []

    def _torque_again(self, uow: UnitOfWork, controller_id: str, event_id: str, key: str) -> None:
        """A tightening already handled (the controller sent it again after a reconnect): its
        record's fate, or `duplicate` when it made none (kept unassigned or refused)."""
        uow.duplicates += 1
        fate = uow.fate(key) if key else None
        if fate is not None:
            delivery.answer(uow, FateQuery(key, event_id, DeviceRef(CONTRACT_KIND[TORQUE_KIND], controller_id)),
                            fate)
            return
        delivery.receipt(uow, DeviceRef(TORQUE_KIND, controller_id), DeviceReceipt("duplicate", utc_now(), event_id))
        uow.note(event_id, None, "DUPLICATE", device_id=controller_id)

    def _made(self, session: Any, read: RawRead, received_at: str, uow: UnitOfWork) -> ReceivedRecord | None:
        """The contract record of a part read within `session`, decoded as a device's would be;
        one the contract refuses goes to the DLQ like any device's (None)."""
        kind = CONTRACT_KIND[read.device_kind]
        try:
            record = decode_record(record_json(session, read), station=self.station,
                                   device_kind=kind, device_id=read.device_id,
                                   max_bytes=self.limits.max_message_bytes, max_depth=self.limits.max_depth)
        except ContractError as exc:
            report = error_report(stage=self.name, errors=exc.errors, received_at=received_at,
                                  event_id=exc.event_id)
            delivery.reject(uow, report, DeviceRef(kind, read.device_id))
            return None
        key = idempotency_key(normalize(record))
        return ReceivedRecord(key, record, received_at, DeviceRef(kind, read.device_id))

    def _keep(self, uow: UnitOfWork, kept: book.UnassignedRead) -> bool:
        """Keep an unassigned read (True, also when it was kept before); a full store refuses it
        to the DLQ (rule unassigned_full, False)."""
        count = self._count(uow)
        if count >= self.limits.max_unassigned_reads and uow.get(book.UNASSIGNED, kept.read.read_id.encode()) is None:
            error = FieldError("$", "unassigned_full",
                               f"at most {self.limits.max_unassigned_reads} unassigned reads: assign them "
                               "(mro-edge reads assign) or open work sessions at the readers' places",
                               f"read {kept.read.read_id} of {kept.read.device_id}")
            delivery.reject(uow, error_report(stage=self.name, errors=[error], received_at=kept.read.received_at),
                            DeviceRef(kept.read.device_kind, kept.read.device_id))
            return False
        if book.keep_unassigned(uow, kept):
            self._unassigned = count + 1
            uow.note(None, None, "UNASSIGNED", read_id=kept.read.read_id, reason=kept.reason,
                     device_id=kept.read.device_id)
        return True

    def _count(self, uow: UnitOfWork) -> int:
        if self._unassigned is None:
            self._unassigned = book.unassigned_count(uow)
        return self._unassigned

    # --- session commands (mro-edge session / reads) ---------------------------------------------

    def handle_notice(self, topic: str, payload: bytes, uow: UnitOfWork) -> None:
        if topic != self.topics.sessions:
            return
        try:
            command = json.loads(payload)
            if not isinstance(command, dict) or not isinstance(command.get("id"), str):
                raise ValueError
        except ValueError:
            get_logger(stage=self.name).warning("unreadable session command ignored")
            return
        reply = self._execute(command, str(command.get("operator", ""))[:64], uow)
        uow.publish(self.topics.sessions_reply(command["id"][:64]), json_encode(reply))

    def _session_command(self, payload: bytes) -> dict[str, Any] | None:
        """A tablet's work session command (`"schema": "mro.work_session/1"`), or None for a record."""
        if len(payload) > self.limits.max_message_bytes or book.SESSION_SCHEMA.encode() not in payload:
            return None
        try:
            doc = json.loads(payload)
        except ValueError:
            return None
        return doc if isinstance(doc, dict) and doc.get("schema") == book.SESSION_SCHEMA else None

    def _tablet(self, message: DeviceMessage, command: dict[str, Any], device_id: str, uow: UnitOfWork) -> None:
        """A technician's tablet opens or closes the session at its place: answered with a device
        receipt (`received`, or `rejected` with rule `work_session` and a DLQ report)."""
        device = DeviceRef("tablet", device_id)
        command_id = command.get("id")
        if not isinstance(command_id, str) or re.search(UUID_PATTERN, command_id) is None:
            reply = {"ok": False, "message": "id must be a UUID chosen by the tablet for this command"}
            command_id = None
        elif command.get("command") not in ("open", "close"):
            reply = {"ok": False, "message": "a tablet may send command open or close"}
        else:
            reply = self._execute(command, f"tablet/{device_id}", uow)
        if reply["ok"]:
            delivery.receipt(uow, device, DeviceReceipt("received", utc_now(), command_id))
            return
        error = FieldError("$", "work_session", str(reply["message"]), f"command {str(command.get('command'))[:16]!r}")
        delivery.reject(uow, error_report(stage=self.name, errors=[error], received_at=message.received_at,
                                          event_id=command_id), device)

    def _execute(self, command: dict[str, Any], operator: str, uow: UnitOfWork) -> dict[str, Any]:
        """Carry out a command once per id: a state change sent again gets the reply it got."""
        command_id, changes = command["id"][:64], command.get("command") in book.CHANGES
        if changes and (done := book.answered(uow, command_id)) is not None:
            return done
        try:
            reply = self._command(command, operator, uow)
        except book.SessionError as exc:
            reply = {"ok": False, "message": str(exc)}
        if changes and reply["ok"]:
            book.remember(uow, command_id, reply)
        self._unassigned = book.unassigned_count(uow)
        return reply

    def _command(self, command: dict[str, Any], operator: str, uow: UnitOfWork) -> dict[str, Any]:
        action = command.get("command")
        command_id = command["id"][:64]
        if action == "open":
            entry = book.opened_entry(command, station=self.station, places=self.places, at=utc_now(),
                                      operator=operator)
            book.store_open(uow, entry)
            self._ledger(uow, entry)
            return {"ok": True, "message": f"session {entry.session_id} open at {entry.place}",
                    "session": msgspec.to_builtins(entry)}
        if action == "close":
            session, parts = book.store_close(uow, str(command.get("place", "")))
            closed = book.closed_entry(session, at=utc_now(), command_id=command_id, operator=operator,
                                       records=parts)
            self._ledger(uow, closed)
            return {"ok": True, "message": f"session {session.session_id} at {session.place} closed "
                    f"({parts} part(s) recorded)", "session_id": session.session_id, "records": parts}
        if action == "list":
            return {"ok": True, "sessions": [msgspec.to_builtins(s) for s in book.open_sessions(uow).values()],
                    "unassigned": book.unassigned_count(uow)}
        if action == "reads_list":
            kept = book.unassigned(uow)
            return {"ok": True, "total": len(kept), "reads": [_shown(k) for k in kept[:1000]]}
        if action == "reads_assign":
            return self._assign(uow, str(command.get("read_id", "")), command.get("place"))
        if action == "reads_raw":
            return book.raw_reply(uow, command.get("sha256", ""))
        raise book.SessionError("command must be open, close, list, reads_list, reads_assign or reads_raw")

    def _assign(self, uow: UnitOfWork, read_id: str, place: Any) -> dict[str, Any]:
        kept = book.take_unassigned(uow, read_id)
        if not kept.assignable:
            raise book.SessionError(f"read {read_id} names no part ({kept.read.problem}): it cannot be made "
                                    "a record without guessing; it stays listed")
        where = str(place) if place else kept.place
        session = book.session_at(uow, where) if where else None
        if session is None:
            raise book.SessionError(f"no session is open at place {where!r}: open one "
                                    "(mro-edge session open) or name another with --place")
        book.drop_unassigned(uow, read_id)
        if not book.first_in_session(uow, session, kept.read):
            return {"ok": True, "message": f"read {read_id}: its part is already recorded in session "
                    f"{session.session_id} (one record per part per session)"}
        made = self._made(session, kept.read, kept.read.received_at, uow)
        if made is None:
            return {"ok": False, "message": f"read {read_id}: the record it makes is refused by the contract; "
                    "its report is in the DLQ (mro-edge dlq list)"}
        if uow.fate(made.key) is None:
            uow.settle(made, Accepted(made, log={"device_id": made.device.id, "read_id": read_id}))
        return {"ok": True, "message": f"read {read_id} recorded in session {session.session_id}",
                "event_id": made.event_id, "idempotency_key": made.key}

    def _ledger(self, uow: UnitOfWork, entry: Any) -> None:
        """A session entry goes downstream as ingest's own record, to the ledger."""
        key = book.entry_key(entry)
        uow.forward(ReceivedRecord(key, entry, entry.at, book.SESSION_DEVICE))
        uow.note(entry.event_id, key, entry.type.upper(), session_id=entry.session_id, place=entry.place)

    def status_extra(self) -> dict[str, Any]:
        return {"unassigned_reads": self._unassigned} if self._unassigned is not None else {}

    def judge(self, item: ReceivedRecord, uow: UnitOfWork) -> Verdict:
        return Accepted(item, log={"device_id": item.device.id})

    def finish(self, uow: UnitOfWork) -> None:
        """One alarm when a device starts being refused (again after RATE_ALARM_EVERY_S)."""
        if not self._limited:
            return
        now = time.monotonic()
        for device_id in sorted(self._limited):
            last = self._alarmed.get(device_id)
            if last is not None and now - last < RATE_ALARM_EVERY_S:
                continue
            self._alarmed[device_id] = now
            detail = (f"device {device_id or '(unknown)'} publishes faster than {self.limits.device_rate_per_s:g}/s "
                      f"(bursts of {self.limits.device_burst}): its records are refused with rule rate_limited "
                      "and counted (mro-edge dlq summary), not recorded; they must be sent again")
            get_logger(stage=self.name).warning("device rate limited", device_id=device_id,
                                                state_transition="RATE_LIMITED")
            uow.publish(self.topics.alarm, alarm_payload(self.name, "rate_limited", detail, device_id=device_id))
        self._limited.clear()
        self._count(uow)
        if len(self._alarmed) > self.limiter.max_devices:
            self._alarmed = {d: t for d, t in self._alarmed.items() if now - t < RATE_ALARM_EVERY_S}


def _shown(kept: book.UnassignedRead) -> dict[str, Any]:
    """One unassigned read as `mro-edge reads list` shows it (no raw bytes)."""
    read = kept.read
    return {"read_id": read.read_id, "device_kind": read.device_kind, "device_id": read.device_id,
            "place": kept.place, "reason": kept.reason, "received_at": read.received_at,
            "occurred_at": read.occurred_at, "cage": read.cage, "part_number": read.part_number,
            "serial": read.serial, "assignable": kept.assignable, "raw_sha256": read.raw_sha256}
