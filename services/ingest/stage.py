"""Ingest: turn a device publish into a durably held record, or a clear rejection.

Decodes the message against device contract v1, derives the idempotency key from the
content, drops re-sends (answering them with what became of the original), and owes every
new record to the validate stage. The `received` receipt leaves only after the commit.
"""

from __future__ import annotations

import msgspec

from shared.contract import ContractError, decode_record, error_report, idempotency_key, normalize
from shared.runtime.stage import DeviceMessage, Stage, UnitOfWork
from shared.runtime.topics import Topics
from shared.runtime.messages import DeviceReceipt, outcomes_decoder, utc_now


class Seen(msgspec.Struct, omit_defaults=True):
    """What ingest remembers per idempotency key, to answer re-sends."""

    event_id: str
    status: str = "received"
    seq: int | None = None
    errors: list[dict] | None = None


_encode_seen = msgspec.msgpack.Encoder().encode
_decode_seen = msgspec.msgpack.Decoder(Seen).decode


class Ingest(Stage):
    name = "ingest"
    consumes = "devices"
    downstream = "validate"

    def notice_topics(self, topics: Topics) -> tuple[str, ...]:
        return (topics.outcomes,)

    def open(self, runtime) -> None:
        self.station = runtime.config.station
        self.limits = runtime.config.limits

    def handle(self, messages: list[DeviceMessage], uow: UnitOfWork) -> None:
        for message in messages:
            device_kind, device_id = uow.topics.parse_device_in(message.topic)
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
                report = error_report(
                    stage=self.name,
                    errors=exc.errors,
                    received_at=message.received_at,
                    event_id=exc.event_id,
                    raw=message.payload,
                    max_raw=self.limits.max_raw_in_report,
                )
                uow.reject(report, device_id=device_id)
                continue
            body = normalize(record)
            key = idempotency_key(body)
            event_id = body["event_id"]
            data = {"body": body, "received_at": message.received_at,
                    "device": {"kind": device_kind, "id": device_id}}
            prior = uow.seen(key)
            if prior is not None:
                self._answer_resend(uow, data, key, _decode_seen(prior))
                continue
            uow.remember(key, _encode_seen(Seen(event_id=event_id)))
            uow.forward(key, data)
            uow.device_receipt(device_id, DeviceReceipt("received", utc_now(), event_id, key))
            uow.transition(event_id, key, "RECEIVED", device_id=device_id)

    def _answer_resend(self, uow: UnitOfWork, data: dict, key: str, prior: Seen) -> None:
        """A re-send is answered with the original's fate. If that fate is not known here yet (or
        its notice was lost), the record is sent down again marked `resend`: the stages that
        already hold it do not process it twice, they answer with its fate instead."""
        event_id, device_id = data["body"]["event_id"], data["device"]["id"]
        if prior.status == "rejected":
            receipt = DeviceReceipt("rejected", utc_now(), event_id, key, errors=prior.errors)
        else:
            receipt = DeviceReceipt("duplicate", utc_now(), event_id, key, seq=prior.seq)
            if prior.seq is None:
                uow.forward(key, dict(data, resend=True))
        uow.device_receipt(device_id, receipt)
        uow.transition(event_id, key, "DUPLICATE", original_event_id=prior.event_id)

    def handle_notice(self, topic: str, payload: bytes, uow: UnitOfWork) -> None:
        """Remember the final fate (ledger seq or rejection) so re-sends can be answered with it."""
        for outcome in outcomes_decoder.decode(payload).outcomes:
            raw = uow.seen(outcome.key)
            if raw is None:
                continue
            seen = _decode_seen(raw)
            seen.status, seen.seq, seen.errors = outcome.status, outcome.seq, outcome.errors
            uow.remember(outcome.key, _encode_seen(seen))
