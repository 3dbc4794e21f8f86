"""Poison isolation: a batch whose handler raises is committed again one input at a time.

Each notice and each record gets its own transaction; a record that still raises is rejected
alone (`stage_error`, DLQ and receipt like any rejection) and the rest commit. Several records
failing in a row is not poison but a failing stage (`StageFault`): the batch is held instead.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import lmdb

from shared.runtime import delivery
from shared.runtime.clock import utc_now
from shared.runtime.handler import DeviceMessage
from shared.runtime.mqtt import Inbound
from shared.runtime.verdicts import Rejected
from shared.runtime.work import UnitOfWork

if TYPE_CHECKING:
    from shared.runtime.stage import Batch, StageRuntime

FAILURES_IN_A_ROW = 3


class StageFault(Exception):
    """The stage itself is failing (several records in a row raised): hold the batch, do not DLQ it."""


def isolate(runtime: StageRuntime, batch: Batch) -> tuple[list[UnitOfWork], list[int]]:
    """Commit the batch input by input; returns the units of work and the settled outbox rows."""
    uows: list[UnitOfWork] = []
    with runtime.transaction() as uow:
        settled = uow.settle_receipts(batch.receipted)
        for message in batch.broken:
            delivery.reject(uow, broken_envelope_report(runtime.stage.name, message), None)
        for report in batch.forged:
            delivery.reject(uow, report, None)
    uows.append(uow)
    failures_in_a_row = 0
    singles: list[Any] = [*batch.notices, *batch.inputs]
    for single in singles:
        try:
            with runtime.transaction() as uow:
                if isinstance(single, Inbound):
                    runtime.notice(single, uow)
                else:
                    delivery.run_batch(runtime.stage, [single], uow)
            failures_in_a_row = 0
        except lmdb.Error:
            raise
        except Exception as exc:
            if isinstance(single, Inbound):
                runtime.log.warning("notice dropped", topic=single.topic, error=type(exc).__name__)
                continue
            failures_in_a_row += 1
            if failures_in_a_row >= FAILURES_IN_A_ROW:
                raise StageFault(f"{failures_in_a_row} records in a row failed: {exc!r}") from exc
            with runtime.transaction() as uow:
                reject_poison(uow, single, exc)
        uows.append(uow)
    return uows, settled


def stage_error(stage: str, exc: Exception) -> dict[str, Any]:
    return {"path": "$", "rule": "stage_error", "expected": f"a record the {stage} stage can process",
            "received": type(exc).__name__}


def reject_poison(uow: UnitOfWork, item: Any, exc: Exception, *, redrive: int = 0) -> None:
    """Reject a record its stage cannot process (the handler raised on it alone); `redrive`: the
    generation of the verdict (`shared.runtime.delivery.settle`)."""
    name = uow.stage.name
    report: dict[str, Any] = {"stage": name, "received_at": utc_now(), "errors": [stage_error(name, exc)]}
    if isinstance(item, DeviceMessage):
        delivery.reject(uow, report, delivery.device_of_topic(uow, item.topic))
        return
    report = {"stage": name, "event_id": item.event_id, "idempotency_key": item.key, **report}
    if report["event_id"] is None:
        del report["event_id"]
    delivery.settle(uow, item, Rejected(report), redrive=redrive)


def broken_envelope_report(stage: str, message: Inbound) -> dict[str, Any]:
    error = {"path": "$", "rule": "envelope",
             "expected": "a pipeline batch {source, items:[...]} of this hop",
             "received": f"{len(message.payload)} unreadable bytes"}
    return {"stage": stage, "received_at": utc_now(), "errors": [error]}
