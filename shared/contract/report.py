"""The error report (DESIGN.md section 4) sent to the DLQ and, as `errors`, in `rejected` receipts."""

from __future__ import annotations

import base64

from shared.contract.errors import FieldError


def error_report(*, stage: str, errors: list[FieldError], received_at: str, event_id: str | None = None,
                 idempotency_key: str | None = None, raw: bytes | None = None, max_raw: int = 4096) -> dict:
    """`{stage, event_id?, idempotency_key?, received_at, errors, raw_b64?, raw_truncated?}`.

    The errors carry no free text (see `shared.contract.errors`); `raw` is the message as it
    arrived, for the DLQ operator, cut to `max_raw` bytes (`[limits] max_raw_in_report`, 4 KiB:
    enough to see what a device sent, too little for a flood of garbage to fill the DLQ) with
    `raw_truncated: true` when cut.
    """
    report: dict = {"stage": stage}
    if event_id is not None:
        report["event_id"] = event_id
    if idempotency_key is not None:
        report["idempotency_key"] = idempotency_key
    report["received_at"] = received_at
    report["errors"] = [{"path": e.path, "rule": e.rule, "expected": e.expected, "received": e.received}
                        for e in errors]
    if raw is not None:
        report["raw_b64"] = base64.b64encode(raw[:max_raw]).decode("ascii")
        if len(raw) > max_raw:
            report["raw_truncated"] = True
    return report
