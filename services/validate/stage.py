"""Validate: judge each received record against the contract's cross-field and time rules.

Time rules are judged against the time ingest received the record, never "now", so a
record replayed from the backlog days later gets the same verdict.
"""

from __future__ import annotations

from datetime import datetime

from shared.contract import check_rules, error_report, record_from_body
from shared.stage import Stage, UnitOfWork
from shared.wire import Item, Outcome, Outcomes, json_encode


class Validate(Stage):
    name = "validate"
    downstream = "sign"

    def open(self, runtime) -> None:
        self.limits = runtime.config.limits

    def handle(self, items: list[Item], uow: UnitOfWork) -> None:
        rejected: list[Outcome] = []
        for item in items:
            if uow.seen(item.key) is not None:
                continue
            body, event_id = item.data["body"], item.data["body"].get("event_id")
            received_at = item.data["received_at"]
            errors = check_rules(
                record_from_body(body),
                received_at=datetime.fromisoformat(received_at),
                clock_skew_s=self.limits.clock_skew_s,
                max_backdate_s=self.limits.max_backdate_days * 86400,
            )
            if errors:
                uow.remember(item.key, b"rejected")
                report = error_report(stage=self.name, errors=errors, received_at=received_at,
                                      event_id=event_id, idempotency_key=item.key)
                uow.reject(report, device_id=item.data["device"]["id"])
                rejected.append(Outcome(item.key, "rejected", errors=report["errors"]))
                continue
            uow.remember(item.key, b"validated")
            uow.forward(item.key, item.data)
            uow.transition(event_id, item.key, "VALIDATED")
        if rejected:
            uow.publish(uow.topics.outcomes, json_encode(Outcomes(rejected)))
