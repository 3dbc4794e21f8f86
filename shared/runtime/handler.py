"""The stage handler protocol: a stage's domain logic, and nothing else.

For each record the runtime has not seen, it calls `judge(item, uow)` and acts on the verdict
(`shared.runtime.verdicts`); dedupe, fates, receipts and outcomes are the runtime's
(`shared.runtime.delivery`). `begin` and `finish` bracket each batch transaction, for stages
that keep per-batch context (sign: the chain head, the Merkle leaves). The intake stage
(`IntakeStage`) first turns each raw device publish into a typed record (`admit`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

from shared.runtime.messages import FateStatus, ReceivedRecord
from shared.runtime.topics import Topics
from shared.runtime.verdicts import Rejected, Verdict

if TYPE_CHECKING:
    from shared.runtime.retention import GatewayHolds
    from shared.runtime.stage import StageRuntime
    from shared.runtime.work import UnitOfWork

In = TypeVar("In")


@dataclass(slots=True)
class DeviceMessage:
    """A raw device publish, as the intake stage sees it."""

    topic: str
    payload: bytes
    received_at: str


class Stage(ABC, Generic[In]):
    """Domain logic of one stage. Subclasses set the class attributes and implement `judge`."""

    name: ClassVar[str] = ""
    consumes: ClassVar[str] = "pipeline"  # "devices" for the intake stage
    input_type: ClassVar[Any] = None  # the hop message this stage takes (shared.runtime.messages)
    downstream: ClassVar[str | None] = None
    tables: ClassVar[tuple[str, ...]] = ()
    accepted_as: ClassVar[FateStatus] = "validated"  # the fate of a record this stage passes on
    accepted_state: ClassVar[str] = "ACCEPTED"  # logged when a record is accepted or recorded
    keeps_rejected: ClassVar[bool] = False  # True: a rejected input is kept whole in the DLQ (redrive)
    # retention (shared.runtime.retention): True for the stage that talks to the gateway and
    # tells the others what it holds (`gateway_holds`); `learns_recorded`: a stage whose fates
    # of records it passed on do not say their seq learns it from sign's outcome notices
    knows_gateway_holds: ClassVar[bool] = False
    learns_recorded: ClassVar[bool] = False

    def notice_topics(self, topics: Topics) -> tuple[str, ...]:
        """Extra topics this stage listens to besides its input and its receipts."""
        return ()

    def open(self, runtime: StageRuntime) -> None:
        """Called once before the first batch (load keys, check stored state)."""

    def begin(self, uow: UnitOfWork) -> None:
        """Called at the start of each batch transaction that has records."""

    @abstractmethod
    def judge(self, item: In, uow: UnitOfWork) -> Verdict:
        """The stage's verdict on one record it has not seen before, inside the batch transaction."""

    def finish(self, uow: UnitOfWork) -> None:
        """Called after the batch's last record, still inside its transaction."""

    def handle_notice(self, topic: str, payload: bytes, uow: UnitOfWork) -> None:
        """Messages on `notice_topics`; processed in the same transaction as the batch."""

    def gateway_holds(self) -> GatewayHolds | None:
        """What the gateway holds, for the stage that `knows_gateway_holds` (None: not known yet)."""
        return None

    def wants_turn(self) -> bool:
        """Asked at each status interval: True runs `begin` and `finish` in a transaction of
        their own, without records (work that must not wait for the next record, e.g. a clock
        step to record, held records to release)."""
        return False

    def status_extra(self) -> dict[str, Any]:
        """Stage-specific fields for the retained status message."""
        return {}

    def close(self) -> None:
        """Called once when the service stops (stop background threads)."""


class IntakeStage(Stage[ReceivedRecord]):
    """The stage devices publish to: it decodes a publish into a record and derives its key."""

    consumes = "devices"
    accepted_as = "received"

    @abstractmethod
    def admit(self, message: DeviceMessage, uow: UnitOfWork) -> ReceivedRecord | list[ReceivedRecord] | Rejected:
        """The record a device publish carries, or why it is not one (a DLQ report). A raw
        hangar device's publish may carry several records, or none the stage did not keep
        itself in the batch transaction `uow` (an unassigned read)."""
