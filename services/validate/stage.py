"""Validate: judge each received record against the contract's cross-field and time rules, then
its regulatory substance (registries, sign-off chains, e-signatures, the box's own history and
the active contract version; `shared.compliance`).

Time rules are judged against the time ingest received the record, never "now", so a record
replayed from the backlog days later gets the same verdict; validity (certificates,
calibrations, reviews) is judged on the UTC day of `occurred_at`.

States logged per record: VALIDATED (contract rules passed) then COMPLIANCE_CHECKED (forwarded
to sign), or REJECTED (DLQ + `rejected` receipt), or HELD while the schema-drift breaker is
open (torque events and part receipts only; see `services.validate.control`).
"""

from __future__ import annotations

from datetime import datetime

import msgspec

from services.validate.control import NON_CRITICAL, SchemaControl, registry_topic, schema_topic
from shared.compliance.rules import STATE_TABLES
from shared.contract import check_rules, error_report, record_from_body
from shared.runtime.stage import Stage, UnitOfWork
from shared.runtime.messages import DeviceReceipt, Item, Outcome, Outcomes, json_encode, utc_now

VALIDATED = b"validated"
HELD = b"held"


class Validate(Stage):
    name = "validate"
    downstream = "sign"
    tables = ("compliance", "held") + STATE_TABLES

    def notice_topics(self, topics) -> tuple[str, ...]:
        return (schema_topic(topics), registry_topic(topics))

    def open(self, runtime) -> None:
        self.limits = runtime.config.limits
        self.control = SchemaControl(self, runtime.config, runtime.store)

    def handle(self, items: list[Item], uow: UnitOfWork) -> None:
        self.control.refresh(uow)
        rejected: list[Outcome] = []
        for item in items:
            prior = uow.seen(item.key)
            if prior is not None:
                if item.data.get("resend"):
                    self._answer_resend(item, prior, uow, rejected)
                continue
            self.judge(item, uow, rejected, may_hold=True)
        if rejected:
            uow.publish(uow.topics.outcomes, json_encode(Outcomes(rejected)))

    def handle_notice(self, topic: str, payload: bytes, uow: UnitOfWork) -> None:
        self.control.refresh(uow)
        rejected: list[Outcome] = []
        self.control.notice(topic, payload, uow, rejected)
        if rejected:
            uow.publish(uow.topics.outcomes, json_encode(Outcomes(rejected)))

    def judge(self, item: Item, uow: UnitOfWork, rejected: list[Outcome], *, may_hold: bool) -> None:
        body, received_at = item.data["body"], item.data["received_at"]
        event_id = body.get("event_id")
        record = record_from_body(body)
        errors = check_rules(
            record,
            received_at=datetime.fromisoformat(received_at),
            clock_skew_s=self.limits.clock_skew_s,
            max_backdate_s=self.limits.max_backdate_days * 86400,
        )
        if not errors and may_hold and self.control.breaker_open and body["type"] in NON_CRITICAL:
            self.control.hold(item, uow)
            uow.remember(item.key, HELD)
            uow.note(event_id, item.key, "HELD", reason="schema_drift_breaker")
            return
        compliance = self.control.compliance
        verdict = compliance.judge(record, body, uow)
        errors.extend(verdict.errors)
        if errors:
            report = error_report(stage=self.name, errors=errors, received_at=received_at,
                                  event_id=event_id, idempotency_key=item.key)
            uow.remember(item.key, json_encode(report["errors"]))
            uow.reject(report, device_id=item.data["device"]["id"])
            rejected.append(Outcome(item.key, "rejected", errors=report["errors"]))
            return
        for table, key, value in verdict.writes:
            uow.put(table, key, value)
        uow.remember(item.key, VALIDATED)
        uow.forward(item.key, item.data)
        uow.note(event_id, item.key, "VALIDATED")
        extra = {"contract": compliance.version.version}
        if verdict.flags:
            extra["flags"] = verdict.flags
        uow.transition(event_id, item.key, "COMPLIANCE_CHECKED", **extra)

    def reject_broken(self, item: Item, exc: Exception, uow: UnitOfWork, rejected: list[Outcome]) -> None:
        """A held record that cannot be judged on release: rejected like the runtime's poison."""
        errors = [{"path": "$", "rule": "stage_error", "expected": "a record the validate stage can process",
                   "received": type(exc).__name__}]
        report = {"stage": self.name, "event_id": item.data["body"].get("event_id"), "idempotency_key": item.key,
                  "received_at": item.data["received_at"], "errors": errors}
        uow.remember(item.key, json_encode(errors))
        uow.reject(report, device_id=item.data["device"]["id"])
        rejected.append(Outcome(item.key, "rejected", errors=errors))

    def _answer_resend(self, item: Item, prior: bytes, uow: UnitOfWork, rejected: list[Outcome]) -> None:
        """A device asked again about a record it sent: pass the question on to sign if it was
        valid, keep quiet while it is held, else repeat the rejection."""
        if prior == VALIDATED:
            uow.forward(item.key, item.data)
            return
        if prior == HELD:
            return
        errors = msgspec.json.decode(prior)
        event_id = item.data["body"]["event_id"]
        uow.device_receipt(item.data["device"]["id"],
                           DeviceReceipt("rejected", utc_now(), event_id, item.key, errors=errors))
        rejected.append(Outcome(item.key, "rejected", errors=errors))

    def status_extra(self) -> dict:
        control = getattr(self, "control", None)
        return control.status() if control else {}
