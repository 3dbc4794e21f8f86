"""`check_rules`: the contract rules that span fields or depend on time.

Time is judged against `received_at`, the moment ingest took the record, never "now": a
record replayed from a backlog days later must get the same verdict it would have got on
arrival. Validity (tool calibration) is judged on the UTC day the work was done.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from shared.contract.errors import FieldError
from shared.contract.scalars import quantity_text, timestamp_text
from shared.contract.types import Record, TorqueEvent

# The rules that judge a record against the box's clock (its receive time). Their verdict is
# only as good as that clock, so a rejection by one of them is never final: a re-send is
# judged again, and a redrive judges it against the time of the redrive
# (`shared.runtime.delivery.rejudged`, `services.validate.redrive`).
TIME_WINDOW_RULES = frozenset({"occurred_in_future", "occurred_too_old"})


def check_rules(record: Record, *, received_at: datetime, clock_skew_s: int = 300,
                max_backdate_s: int = 30 * 86400) -> list[FieldError]:
    """Every cross-field and time rule `record` breaks (empty when it passes).

    `received_at` must be timezone-aware. `occurred_at` may lie up to `clock_skew_s` after it
    (device clocks drift) and up to `max_backdate_s` before it, both bounds inclusive.
    """
    if received_at.tzinfo is None:
        raise ValueError("received_at must be timezone-aware")
    errors = []
    occurred: datetime = record.occurred_at  # as a plain datetime, so it subtracts from received_at
    received = timestamp_text(received_at.astimezone(UTC))
    if occurred - received_at > timedelta(seconds=clock_skew_s):
        errors.append(FieldError("$.occurred_at", "occurred_in_future",
                                 f"at most {clock_skew_s} s after the receive time {received}",
                                 timestamp_text(occurred)))
    elif received_at - occurred > timedelta(seconds=max_backdate_s):
        errors.append(FieldError("$.occurred_at", "occurred_too_old",
                                 f"at most {max_backdate_s} s before the receive time {received}",
                                 timestamp_text(occurred)))
    if isinstance(record, TorqueEvent):
        errors.extend(_torque_errors(record))
    return errors


def _torque_errors(record: TorqueEvent) -> list[FieldError]:
    errors = []
    low, high, torque = record.torque_min_nm, record.torque_max_nm, record.torque_nm
    if low > high:
        errors.append(FieldError("$.torque_max_nm", "torque_range",
                                 f"at least torque_min_nm ({quantity_text(low)})", quantity_text(high)))
    else:
        inside = low <= torque <= high
        if (record.result == "OK") != inside:
            verdict = "inside" if inside else "outside"
            errors.append(FieldError(
                "$.result", "torque_result",
                f"{'OK' if inside else 'NOK'}: torque {quantity_text(torque)} N·m is {verdict} "
                f"[{quantity_text(low)}, {quantity_text(high)}]",
                record.result))
    work_day = record.occurred_at.date()
    if record.tool.calibration_due < work_day:
        errors.append(FieldError("$.tool.calibration_due", "calibration_overdue",
                                 f"on or after {work_day.isoformat()} (the UTC day of occurred_at)",
                                 record.tool.calibration_due.isoformat()))
    return errors
