"""DLQ redrive (`mro-edge dlq redrive`): judge rejected records again once their cause is fixed.

A record rejected because a registry was out of date (unknown tool, overdue calibration) is kept
whole in this stage's DLQ (`Stage.keeps_rejected`, `shared.runtime.dlq`). The operator fixes the
cause and sends `{"command": "redrive", "id", "sent_at", "operator", "selection": {rule?,
device?, since?, id?, all?, limit?}}` on `Topics.redrive`; this stage selects the rows from its
own DLQ in the notice's batch transaction, judges each again under what is in force now and
answers on `Topics.redrive_reply(id)` with how many were selected, accepted and still rejected.

Exactly once: only a row whose key's fate is `rejected` *and* whose generation matches the fate's
(`Fate.redrive`) is redriven; the new verdict is settled as generation + 1 and the row leaves the
DLQ in the same transaction. An accepted record goes to sign under its original idempotency key
(sign's dedupe: at most one ledger entry whatever happens), is receipted `recorded` like a
first-time record, and ingest learns the new fate from the outcome (`delivery.supersedes`). A
still-invalid record is rejected again: a new DLQ row with the new report. A device re-send of a
rejected record never reaches `judge` (its key has a fate), so it cannot race a redrive into the
ledger. A record rejected by a time-window rule (`shared.contract.TIME_WINDOW_RULES`) is judged
against the time of the redrive, not the time it was first received: that verdict was only as
good as the box's clock then, and the clock is what the operator fixed. Each redrive that judged
anything goes to the ledger as one `dlq_redrive` entry naming
every record, the selection and the operator; a command id already carried out is answered with
its first reply and nothing else (a QoS 1 duplicate, a retry).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any

import msgspec
from msgspec import Meta

from services.validate.changes import CONTROL_DEVICE
from services.validate.commands import check_fresh, read_command
from services.validate.contract import CommandError
from services.validate.registry import CONTROL_TABLE
from shared.contract import TIME_WINDOW_RULES, idempotency_key
from shared.contract.scalars import stored_hook
from shared.runtime import dlq
from shared.runtime.clock import parse_utc, utc_now
from shared.runtime.dlq import DLQ, Row
from shared.runtime.messages import DlqRedrive, ReceivedRecord, RedriveItem, ValidatedRecord, json_encode
from shared.runtime.poison import reject_poison
from shared.runtime.store import from_u64, u64
from shared.runtime.verdicts import Accepted, Verdict
from shared.runtime.work import UnitOfWork

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
SCHEMA = "mro.dlq-redrive/1"
_DONE = b"redrive/done/"  # CONTROL_TABLE: command id -> its reply (a repeated command is answered again)

Judge = Callable[[ReceivedRecord, UnitOfWork], Verdict]

_record_decoder = msgspec.json.Decoder(ReceivedRecord, dec_hook=stored_hook)


class Selection(msgspec.Struct, frozen=True, omit_defaults=True, forbid_unknown_fields=True):
    """Which DLQ rows a redrive takes: every given filter must match (`all`: no filter at all)."""

    rule: Annotated[str, Meta(max_length=64)] | None = None
    device: Annotated[str, Meta(max_length=64)] | None = None
    since: Annotated[str, Meta(max_length=40)] | None = None
    id: Annotated[int, Meta(ge=0, le=(1 << 63) - 1)] | None = None
    all: bool = False
    limit: int = DEFAULT_LIMIT


class Candidate(msgspec.Struct, frozen=True):
    row_id: int
    row: Row
    item: ReceivedRecord


def parse_selection(raw: Any) -> Selection:
    """The command's selection, checked; CommandError says what is wrong with it."""
    try:
        selection = msgspec.convert(raw if raw is not None else {}, Selection)
    except msgspec.ValidationError as exc:
        raise CommandError(f"unreadable selection: {exc}") from None
    if not (selection.all or selection.rule or selection.device or selection.since or selection.id is not None):
        raise CommandError("no selection: give --rule, --device, --since or --id (or --all for every "
                           "redrivable row)")
    if not 1 <= selection.limit <= MAX_LIMIT:
        raise CommandError(f"--limit must be between 1 and {MAX_LIMIT}")
    if selection.since is not None:
        _since(selection)
    return selection


def _since(selection: Selection) -> datetime | None:
    if selection.since is None:
        return None
    try:
        return parse_utc(selection.since)
    except ValueError:
        raise CommandError(f"--since {selection.since[:40]!r} is not an RFC 3339 UTC time "
                           "(e.g. 2026-12-06T04:00:00Z)") from None


def matches(selection: Selection, row_id: int, row: Row, item: ReceivedRecord) -> bool:
    """Whether a stored row is in the selection: `id` the DLQ row id, `rule` any of its errors'
    rules, `device` the sending device's id, `since` the time ingest received the record."""
    if selection.id is not None and row_id != selection.id:
        return False
    if selection.rule is not None and selection.rule not in row.rules:
        return False
    if selection.device is not None and item.device.id != selection.device:
        return False
    since = _since(selection)
    return since is None or parse_utc(item.received_at) >= since


def select(uow: UnitOfWork, selection: Selection) -> tuple[list[Candidate], bool]:
    """The redrivable rows in the selection, oldest first, at most `limit`; and whether more match."""
    start = u64(selection.id) if selection.id is not None else b""
    found: list[Candidate] = []
    for key, value in uow.scan(DLQ, start):
        row_id = from_u64(key)
        if selection.id is not None and row_id != selection.id:
            break
        row = dlq.decode_row(value)
        if not row.record:
            continue  # a report without its record (ingest's, or counted beyond the budget)
        if selection.rule is not None and selection.rule not in row.rules:
            continue  # decided without decoding the record
        item = _record_decoder.decode(row.record)
        if matches(selection, row_id, row, item):
            if len(found) == selection.limit:
                return found, True
            found.append(Candidate(row_id, row, item))
    return found, False


def redrive_one(uow: UnitOfWork, candidate: Candidate, judge: Judge) -> RedriveItem | None:
    """Judge one row's record again if its key is still rejected at the row's generation; the row
    leaves the DLQ either way (a stale row's record was already judged again). None if skipped."""
    item, row = candidate.item, candidate.row
    if TIME_WINDOW_RULES.intersection(row.rules):
        item = msgspec.structs.replace(item, received_at=utc_now())  # judged against the clock now
    fate = uow.fate(item.key)
    if fate is None:
        return None  # this store does not know the record: leave the row for a person to read
    dlq.remove(uow, candidate.row_id)
    if fate.status != "rejected" or fate.redrive != row.redrive:
        uow.note(item.event_id, item.key, "REDRIVE_STALE_ROW", dlq_id=candidate.row_id)
        return None
    generation = fate.redrive + 1
    uow.note(item.event_id, item.key, "REDRIVEN", dlq_id=candidate.row_id, redrive=generation)
    try:
        verdict = judge(item, uow)
    except Exception as exc:  # one broken record must not stop the others
        reject_poison(uow, item, exc, redrive=generation)
        return _item(candidate, ["stage_error"])
    uow.settle(item, verdict, redrive=generation)
    if isinstance(verdict, Accepted):
        return _item(candidate, None)
    after = uow.fate(item.key)
    return _item(candidate, sorted({e.rule for e in (after.errors or [])}) if after else [])


def _item(candidate: Candidate, rules: list[str] | None) -> RedriveItem:
    item = candidate.item
    return RedriveItem(item.key, item.event_id, item.device.id, candidate.row_id,
                       "accepted" if rules is None else "rejected", rules)


class Redrive:
    """Carries out redrive commands for the validate stage (`station`, `judge` without holding)."""

    def __init__(self, station: str, judge: Judge, breaker_open: Callable[[], bool], log,
                 clock_untrusted: Callable[[], bool] = lambda: False):
        self.station = station
        self.judge = judge
        self.breaker_open = breaker_open
        self.clock_untrusted = clock_untrusted
        self.log = log

    def handle(self, payload: bytes, uow: UnitOfWork) -> None:
        read = read_command(payload, self.log, "redrive")
        if read is None:
            return
        command, command_id = read
        done = uow.get(CONTROL_TABLE, _DONE + command_id.encode())
        if done is not None:
            reply = {**msgspec.json.decode(done), "repeated": True}
        else:
            try:
                reply = {**self.run(command, command_id, uow), "ok": True}
            except CommandError as exc:
                reply = {"ok": False, "message": str(exc)}
            reply["id"] = command_id
            kept = {name: value for name, value in reply.items() if name != "items"}  # the ledger names them
            uow.put(CONTROL_TABLE, _DONE + command_id.encode(), json_encode(kept))
        uow.publish(uow.topics.redrive_reply(command_id), json_encode(reply))

    def run(self, command: dict, command_id: str, uow: UnitOfWork) -> dict[str, Any]:
        check_fresh(command)
        if command.get("command") != "redrive":
            raise CommandError(f"unknown command {str(command.get('command'))[:40]!r}")
        selection = parse_selection(command.get("selection"))
        if self.breaker_open():
            raise CommandError("the schema-drift breaker is open: settle the contract version first "
                               "(mro-edge schema status), then redrive")
        if self.clock_untrusted():
            raise CommandError("the box's clock is not synchronised and [clock] require_sync is set: "
                               "get NTP working (mro-edge status shows the clock), then redrive")
        candidates, more = select(uow, selection)
        items = [done for c in candidates if (done := redrive_one(uow, c, self.judge)) is not None]
        accepted = sum(1 for i in items if i.result == "accepted")
        reply: dict[str, Any] = {"selected": len(items), "accepted": accepted, "rejected": len(items) - accepted,
                                 "more": more, "items": msgspec.to_builtins(items)}
        if items:
            entry = DlqRedrive(schema=SCHEMA, event_id=str(uuid.uuid4()), station=self.station, at=utc_now(),
                               command_id=command_id, operator=str(command.get("operator") or "unknown")[:64],
                               selection=msgspec.to_builtins(selection), selected=len(items), accepted=accepted,
                               rejected=len(items) - accepted, items=items, more=more)
            key = idempotency_key(msgspec.to_builtins(entry))
            uow.forward(ValidatedRecord(key, entry, CONTROL_DEVICE))
            uow.note(entry.event_id, key, "DLQ_REDRIVE_FORWARDED", selected=len(items), accepted=accepted)
            reply["ledger_event_id"] = entry.event_id
        self.log.warning("dlq redrive", state_transition="DLQ_REDRIVE", command_id=command_id,
                         selected=len(items), accepted=accepted, more=more)
        reply["message"] = (f"{len(items)} record(s) redriven: {accepted} accepted, {len(items) - accepted} "
                            "still rejected" + ("; more match: run it again" if more else ""))
        return reply
