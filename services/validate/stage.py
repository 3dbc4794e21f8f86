"""Validate: judge each received record against the contract's cross-field and time rules, then
its regulatory substance (registries, sign-off chains, e-signatures, the box's own history and
the active contract version; `shared.compliance`).

Time rules are judged against the time ingest received the record, never "now", so a record
replayed from the backlog days later gets the same verdict; validity (certificates,
calibrations, reviews) is judged on the UTC day of `occurred_at`.

States logged per record: VALIDATED (contract rules passed) then COMPLIANCE_CHECKED (forwarded
to sign), or REJECTED (DLQ + `rejected` receipt), or HELD while the schema-drift breaker is
open (torque events and part receipts only; see `services.validate.held`; the control settles
them when the breaker closes), or HELD while `[clock] require_sync` is set and the box's clock is
not synchronised (every record the time rules judge; released, oldest first, once it is).
"""

from __future__ import annotations

from datetime import datetime

from services.validate.control import SchemaControl
from services.validate.held import HELD_TABLE, NON_CRITICAL
from services.validate.registry import CONTROL_TABLE
from shared.compliance.rules import STATE_TABLES
from shared.contract import check_rules, error_report, normalize
from shared.runtime.handler import Stage
from shared.runtime.messages import ReceivedRecord, ValidatedRecord, WorkSessionClosed, WorkSessionOpened
from shared.runtime.topics import Topics
from shared.runtime.verdicts import Accepted, Held, Rejected, Verdict
from shared.runtime.work import UnitOfWork


class Validate(Stage[ReceivedRecord]):
    name = "validate"
    input_type = ReceivedRecord
    downstream = "sign"
    tables = (CONTROL_TABLE, HELD_TABLE, *STATE_TABLES)
    accepted_state = "COMPLIANCE_CHECKED"
    keeps_rejected = True  # decoded records: kept whole in the DLQ for `mro-edge dlq redrive`
    learns_recorded = True  # its fates say `validated`; sign's outcomes tell the seq (retention)

    def notice_topics(self, topics: Topics) -> tuple[str, ...]:
        return (topics.schema, topics.registry, topics.redrive)

    def open(self, runtime) -> None:
        self.limits = runtime.config.limits
        self.control = SchemaControl(self, runtime.config, runtime.store)

    def begin(self, uow: UnitOfWork) -> None:
        self.control.refresh(uow)
        if self.control.clock_release_due:
            released = self.control.release(uow)
            uow.note(None, None, "CLOCK_HOLD_RELEASED", released=released)

    def wants_turn(self) -> bool:
        control = getattr(self, "control", None)
        return control is not None and control.clock_release_due

    def handle_notice(self, topic: str, payload: bytes, uow: UnitOfWork) -> None:
        self.control.refresh(uow)
        self.control.notice(topic, payload, uow)

    def judge(self, item: ReceivedRecord, uow: UnitOfWork, *, may_hold: bool = True) -> Verdict:
        record = item.record
        if isinstance(record, WorkSessionOpened | WorkSessionClosed):
            # ingest's own entry (its context was checked against the contract when it was
            # opened); sign accepts it only from ingest's session plane (`entry_source`)
            return Accepted(ValidatedRecord(item.key, record, item.device))
        if may_hold and self.control.clock_untrusted:
            self.control.hold(item, uow)
            return Held("clock_unsynchronised")
        errors = check_rules(
            record,
            received_at=datetime.fromisoformat(item.received_at),
            clock_skew_s=self.limits.clock_skew_s,
            max_backdate_s=self.limits.max_backdate_days * 86400,
        )
        if not errors and may_hold and self.control.breaker_open and record.type in NON_CRITICAL:
            self.control.hold(item, uow)
            return Held("schema_drift_breaker")
        compliance = self.control.compliance
        verdict = compliance.judge(record, normalize(record), uow)
        errors.extend(verdict.errors)
        if errors:
            return Rejected(error_report(stage=self.name, errors=errors, received_at=item.received_at,
                                         event_id=item.event_id, idempotency_key=item.key))
        for table, key, value in verdict.writes:
            uow.put(table, key, value)
        uow.note(item.event_id, item.key, "VALIDATED")
        log: dict = {"contract": compliance.version.version}
        if verdict.flags:
            log["flags"] = verdict.flags
        return Accepted(ValidatedRecord(item.key, record, item.device), log=log)

    def status_extra(self) -> dict:
        control = getattr(self, "control", None)
        return control.status() if control else {}
