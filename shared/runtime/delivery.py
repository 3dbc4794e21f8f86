"""The runtime owns delivery: dedupe, fates, receipts and outcomes, for every stage alike.

One batch (`run_batch`), inside its transaction:

1. the intake stage `admit`s each device publish (a record with its key, or a rejection);
2. a key with a known fate is not judged again: a record redelivered between stages is
   dropped (it was handled), a re-send from a device is answered (`answer`);
3. every other record gets the handler's verdict, and `settle` acts on it.

What each verdict sends (device receipts only for fleet devices, never for the box's own
records; `outcomes` go to ingest, which keeps the final fate to answer later re-sends):

=========  ==================  ===========  ======================  ===============
verdict    fate in `seen`      downstream   device receipt          outcome notice
=========  ==================  ===========  ======================  ===============
Accepted   received/validated  output       `received` (intake)     -
Recorded   recorded, seq       output       `recorded`, seq         recorded, seq
Rejected   rejected, errors    -            `rejected`, errors      rejected
Held       held                -            -                       -
=========  ==================  ===========  ======================  ===============

A `rejected` fate by a time-window rule is not final (`rejudged`): a re-send of the record is
judged again, as the next generation, at ingest and at validate.

Redrive (`services.validate.redrive`): a `rejected` fate is the one final fate that can change,
exactly once per DLQ row: the redrive settles the new verdict with generation `Fate.redrive + 1`
and the outcome carries it, so ingest (`supersedes`) keeps the newest verdict whatever order
notices arrive in, and never lets a `recorded` fate go.

Durability: fates, outbox rows and DLQ reports commit with the batch. Device receipts and
outcome notices are published after the commit, best effort: a device that missed its receipt
sends the record again, and that re-send is answered from the fate (ingest answers
`duplicate`; while ingest does not know the final fate yet, the re-send travels on as a
`FateQuery` to the stage that does, which answers the device and sends the outcome again).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import msgspec

from shared.contract.checks import TIME_WINDOW_RULES
from shared.contract.errors import FieldError
from shared.runtime import dlq
from shared.runtime.clock import utc_now
from shared.runtime.handler import IntakeStage
from shared.runtime.messages import (
    SERVICE_KIND,
    DeviceReceipt,
    DeviceRef,
    Fate,
    FateQuery,
    Outcome,
    json_encode,
    outcomes_decoder,
)
from shared.runtime.verdicts import Accepted, Held, Recorded, Rejected, Verdict

if TYPE_CHECKING:
    from shared.runtime.handler import DeviceMessage, Stage
    from shared.runtime.work import UnitOfWork


class Routed(Protocol):
    """What the runtime reads of any hop message."""

    @property
    def key(self) -> str: ...

    @property
    def event_id(self) -> str | None: ...

    @property
    def device(self) -> DeviceRef | None: ...


def run_batch(stage: Stage, inputs: list[Any], uow: UnitOfWork) -> None:
    """One batch of a stage's inputs (device publishes for the intake stage, hop items otherwise)."""
    stage.begin(uow)
    intake = isinstance(stage, IntakeStage)
    for input_ in inputs:
        for item in admit(stage, input_, uow) if isinstance(stage, IntakeStage) else (input_,):
            fate = uow.fate(item.key)
            if not isinstance(item, FateQuery) and fate is not None and rejudged(fate):
                rejudge(uow, stage, item, fate)
            elif isinstance(item, FateQuery) or (intake and fate is not None):
                uow.duplicates += not isinstance(item, FateQuery)
                answer(uow, item, fate)
            elif fate is None:
                settle(uow, item, stage.judge(item, uow))
            else:
                uow.duplicates += 1
    stage.finish(uow)


def admit(stage: IntakeStage, message: DeviceMessage, uow: UnitOfWork) -> list[Any]:
    """The records of a device publish (none once its rejection is settled)."""
    admitted = stage.admit(message, uow)
    if isinstance(admitted, Rejected):
        reject(uow, admitted.report, device_of_topic(uow, message.topic), counted_only=admitted.counted_only)
        return []
    return admitted if isinstance(admitted, list) else [admitted]


def device_of_topic(uow: UnitOfWork, topic: str) -> DeviceRef | None:
    parsed = uow.topics.parse_device_in(topic)
    return DeviceRef(*parsed) if parsed else None


def settle(uow: UnitOfWork, item: Routed, verdict: Verdict, *, redrive: int = 0) -> None:
    """Store the fate the verdict gives `item` and send what it owes (see the table above).

    `redrive`: the generation of this verdict (0 the first judgement, n the n-th DLQ redrive),
    kept in the fate and told in the outcome so ingest replaces an older final fate with it."""
    stage = uow.stage
    key, event_id, device = item.key, item.event_id, item.device
    match verdict:
        case Accepted(output=output, log=log):
            uow.set_fate(key, Fate(stage.accepted_as, redrive=redrive))
            uow.forward(output)
            if stage.consumes == "devices":
                receipt(uow, device, DeviceReceipt("received", utc_now(), event_id, key))
            finished(uow, event_id, key, stage.accepted_state, **log)
            uow.passed += 1
        case Recorded(seq=seq, output=output):
            uow.set_fate(key, Fate("recorded", seq, redrive=redrive))
            if output is not None:
                uow.forward(output)
            receipt(uow, device, DeviceReceipt("recorded", utc_now(), event_id, key, seq=seq))
            outcome(uow, device, Outcome(key, "recorded", seq=seq))
            finished(uow, event_id, key, stage.accepted_state, seq=seq)
            uow.passed += 1
        case Rejected(report=report, counted_only=counted_only):
            kept = item if stage.keeps_rejected else None
            errors = reject(uow, report, device, counted_only=counted_only, record=kept, redrive=redrive)
            uow.set_fate(key, Fate("rejected", errors=errors, redrive=redrive))
            outcome(uow, device, Outcome(key, "rejected", errors=errors, redrive=redrive))
        case Held(reason=reason):
            uow.set_fate(key, Fate("held", redrive=redrive))
            uow.note(event_id, key, "HELD", reason=reason)


def rejudged(fate: Fate) -> bool:
    """Whether a record with this fate is judged again when it comes back: a rejection by a
    time-window rule (`shared.contract.TIME_WINDOW_RULES`) was judged against the box's clock,
    which may have been wrong, so it is not final. The new verdict is settled as the next
    generation (like a redrive), so ingest keeps it over the old one; sign's dedupe still lets
    at most one entry into the ledger."""
    return fate.status == "rejected" and any(error.rule in TIME_WINDOW_RULES for error in fate.errors or ())


def rejudge(uow: UnitOfWork, stage: Stage, item: Routed, fate: Fate) -> None:
    """Judge a re-sent record whose rejection is not final (`rejudged`) again. Rejected again by
    the same rules, it is answered like a re-send (receipt and outcome, nothing stored): its DLQ row
    stays the one to redrive, and a device re-sending while the clock is still wrong fills no DLQ.
    Any other verdict is settled as the next generation."""
    generation = fate.redrive + 1
    verdict = stage.judge(item, uow)
    if isinstance(verdict, Rejected):
        errors = msgspec.convert(verdict.report["errors"], list[FieldError])
        rules = sorted({error.rule for error in errors})
        if rules == sorted({error.rule for error in fate.errors or ()}):
            uow.duplicates += 1
            receipt(uow, item.device, DeviceReceipt("rejected", utc_now(), item.event_id, item.key, errors=errors))
            outcome(uow, item.device, Outcome(item.key, "rejected", errors=errors, redrive=generation))
            uow.note(item.event_id, item.key, "REJUDGED_UNCHANGED", rules=rules)
            return
    uow.note(item.event_id, item.key, "REJUDGED", redrive=generation)
    settle(uow, item, verdict, redrive=generation)


def answer(uow: UnitOfWork, query: Routed, fate: Fate | None) -> None:
    """A device sent `query.key` again: tell it the record's fate, or pass the question on to
    the stage that will know it. A held record is not answered until it is settled."""
    intake = uow.stage.consumes == "devices"
    key, event_id, device = query.key, query.event_id, query.device
    if fate is None:
        uow.note(event_id, key, "QUERY_UNKNOWN")  # this store does not know the record (not its stage's)
        return
    if fate.status == "recorded":
        receipt(uow, device, DeviceReceipt("duplicate", utc_now(), event_id, key, seq=fate.seq))
        if not intake:
            outcome(uow, device, Outcome(key, "recorded", seq=fate.seq))
    elif fate.status == "rejected":
        receipt(uow, device, DeviceReceipt("rejected", utc_now(), event_id, key, errors=fate.errors))
        if not intake:
            outcome(uow, device, Outcome(key, "rejected", errors=fate.errors, redrive=fate.redrive))
    elif fate.status != "held":
        if device is not None and event_id is not None and uow.stage.downstream:
            uow.forward(FateQuery(key, event_id, device))
        if intake:
            receipt(uow, device, DeviceReceipt("duplicate", utc_now(), event_id, key))
    if intake:
        finished(uow, event_id, key, "DUPLICATE")


def reject(uow: UnitOfWork, report: dict[str, Any], device: DeviceRef | None, *,
           counted_only: bool = False, record: Any = None, redrive: int = 0) -> list[FieldError]:
    """Keep the error report in the stage's DLQ (within its budget, `shared.runtime.dlq`), publish
    it to the DLQ topic and tell the device; `counted_only`: tell the device and count it, no more.
    `record`: the decoded record itself, kept in the DLQ row so it can be redriven."""
    errors = msgspec.convert(report["errors"], list[FieldError])
    if counted_only:
        dlq.count(uow, device, (error.rule for error in errors))
    else:
        uow.keep_report(report, device, errors, record=record, redrive=redrive)
        # the DLQ topic names the sending device (a validated id, never free text) for the MCC page
        published = report if device is None else {**report, "device_id": device.id}
        uow.publish(uow.topics.dlq(uow.stage.name), json_encode(published))
        uow.note(report.get("event_id"), report.get("idempotency_key"), "REJECTED",
                 rules=[error.rule for error in errors])
    receipt(uow, device, DeviceReceipt("rejected", utc_now(), report.get("event_id"),
                                       report.get("idempotency_key"), errors=errors))
    uow.failed += 1
    return errors


def apply_outcomes(uow: UnitOfWork, payload: bytes) -> None:
    """Outcome notices at the intake stage: remember each record's final fate for its re-sends."""
    for told in outcomes_decoder.decode(payload).outcomes:
        fate = uow.fate(told.key)
        if fate is not None and supersedes(told, fate):
            uow.set_fate(told.key, Fate(told.status, told.seq, told.errors, told.redrive))


def supersedes(told: Outcome, fate: Fate) -> bool:
    """Whether an outcome notice replaces the fate ingest keeps: any final fate replaces an open
    one; a `recorded` one is never replaced (the ledger is final); a `rejected` one gives way to
    `recorded` (a redrive got it into the ledger) or to a newer redrive's rejection. Notices may
    arrive in any order, so a stale rejection never overwrites a newer verdict."""
    if not fate.final:
        return True
    if fate.status == "recorded":
        return False
    return told.status == "recorded" or told.redrive > fate.redrive


def receipt(uow: UnitOfWork, device: DeviceRef | None, message: DeviceReceipt) -> None:
    if device is not None and device.kind != SERVICE_KIND:
        uow.publish(uow.topics.receipt(device.id), json_encode(message))


def outcome(uow: UnitOfWork, device: DeviceRef | None, told: Outcome) -> None:
    if device is not None and device.kind != SERVICE_KIND:
        uow.outcomes.append(told)


def finished(uow: UnitOfWork, event_id: str | None, key: str, state: str, **extra: Any) -> None:
    """A state change that finishes this stage's work on a record (counted as processed)."""
    uow.note(event_id, key, state, **extra)
    uow.processed += 1
