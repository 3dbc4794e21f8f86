"""Ingest: turn a device publish into a durably held record, or a clear rejection.

`admit` first takes a token from the device's bucket (`ratelimit`): a device over its rate is
refused with rule `rate_limited`, answered and counted but not decoded or stored. Otherwise it
decodes the message against device contract v1 and derives the idempotency key from the
content; the runtime then drops re-sends (answering them with what became of the original)
and owes every new record to the validate stage, with its `received` receipt after the commit
(`shared.runtime.delivery`).
"""

from __future__ import annotations

import time

from services.ingest.ratelimit import RateLimiter
from shared.contract import ContractError, FieldError, decode_record, error_report, idempotency_key, normalize
from shared.contract.decode import peek_event_id
from shared.runtime.alarms import alarm_payload
from shared.runtime.handler import DeviceMessage, IntakeStage
from shared.runtime.logs import get_logger
from shared.runtime.messages import DeviceRef, ReceivedRecord
from shared.runtime.verdicts import Accepted, Rejected, Verdict
from shared.runtime.work import UnitOfWork

# a device that stays over its rate is alarmed again after this long
RATE_ALARM_EVERY_S = 300.0


class Ingest(IntakeStage):
    name = "ingest"
    downstream = "validate"
    accepted_state = "RECEIVED"

    def open(self, runtime) -> None:
        self.station = runtime.config.station
        self.limits = runtime.config.limits
        self.topics = runtime.topics
        self.limiter = RateLimiter(self.limits.device_rate_per_s, self.limits.device_burst)
        self._limited: set[str] = set()  # devices refused in the current batch
        self._alarmed: dict[str, float] = {}  # device id -> when its rate alarm was last raised

    def admit(self, message: DeviceMessage) -> ReceivedRecord | Rejected:
        device_kind, device_id = self.topics.parse_device_in(message.topic) or ("", "")
        if not self.limiter.allow(device_id):
            self._limited.add(device_id)
            return self._rate_limited(message)
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
        if len(self._alarmed) > self.limiter.max_devices:
            self._alarmed = {d: t for d, t in self._alarmed.items() if now - t < RATE_ALARM_EVERY_S}
