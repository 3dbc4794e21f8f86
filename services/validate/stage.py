"""Validate: judge each received record against the contract's cross-field and time rules.

Time rules are judged against the time ingest received the record, never "now", so a
record replayed from the backlog days later gets the same verdict.
"""

from __future__ import annotations

from datetime import datetime

import msgspec

from shared.contract import check_rules, error_report, record_from_body
from shared.stage import Stage, UnitOfWork
from shared.wire import DeviceReceipt, Item, Outcome, Outcomes, json_encode, utc_now

VALIDATED = b"validated"


class Validate(Stage):
    name = "validate"
    downstream = "sign"

    def open(self, runtime) -> None:
        self.limits = runtime.config.limits

    def handle(self, items: list[Item], uow: UnitOfWork) -> None:
        rejected: list[Outcome] = []
        for item in items:
            prior = uow.seen(item.key)
            if prior is not None:
                if item.data.get("resend"):
                    self._answer_resend(item, prior, uow, rejected)
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
                report = error_report(stage=self.name, errors=errors, received_at=received_at,
                                      event_id=event_id, idempotency_key=item.key)
                uow.remember(item.key, json_encode(report["errors"]))
                uow.reject(report, device_id=item.data["device"]["id"])
                rejected.append(Outcome(item.key, "rejected", errors=report["errors"]))
                continue
            uow.remember(item.key, VALIDATED)
            uow.forward(item.key, item.data)
            uow.transition(event_id, item.key, "VALIDATED")
        if rejected:
            uow.publish(uow.topics.outcomes, json_encode(Outcomes(rejected)))

    def _answer_resend(self, item: Item, prior: bytes, uow: UnitOfWork, rejected: list[Outcome]) -> None:
        """A device asked again about a record it sent: pass the question on to sign if it was
        valid, else repeat the rejection."""
        if prior == VALIDATED:
            uow.forward(item.key, item.data)
            return
        errors = msgspec.json.decode(prior)
        event_id = item.data["body"]["event_id"]
        uow.device_receipt(item.data["device"]["id"],
                           DeviceReceipt("rejected", utc_now(), event_id, item.key, errors=errors))
        rejected.append(Outcome(item.key, "rejected", errors=errors))
