"""Ingest: turn a device publish into a durably held record, or a clear rejection.

`admit` decodes the message against device contract v1 and derives the idempotency key from
the content; the runtime then drops re-sends (answering them with what became of the
original) and owes every new record to the validate stage, with its `received` receipt after
the commit (`shared.runtime.delivery`).
"""

from __future__ import annotations

from shared.contract import ContractError, decode_record, error_report, idempotency_key, normalize
from shared.runtime.handler import DeviceMessage, IntakeStage
from shared.runtime.messages import DeviceRef, ReceivedRecord
from shared.runtime.verdicts import Accepted, Rejected, Verdict
from shared.runtime.work import UnitOfWork


class Ingest(IntakeStage):
    name = "ingest"
    downstream = "validate"
    accepted_state = "RECEIVED"

    def open(self, runtime) -> None:
        self.station = runtime.config.station
        self.limits = runtime.config.limits
        self.topics = runtime.topics

    def admit(self, message: DeviceMessage) -> ReceivedRecord | Rejected:
        device_kind, device_id = self.topics.parse_device_in(message.topic) or ("", "")
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

    def judge(self, item: ReceivedRecord, uow: UnitOfWork) -> Verdict:
        return Accepted(item, log={"device_id": item.device.id})
