"""What travels between the stages on `mro/<station>/pipeline/...`, and the device receipt.

Every hop has its own msgspec Struct with a version tag (`"type": "received/1"` ...), so a
reader of any stage knows exactly what it gets and a format change is explicit:

    ingest --ReceivedRecord--> validate --ValidatedRecord--> sign --SignedRow--> uplink

A `FateQuery` may ride the same hop instead of a record: a device sent the record again and
the stage before does not know its final fate (see `shared.runtime.delivery`). A pipeline
message (`Envelope`) carries many items of one hop, each with its idempotency key, which is
also what the downstream `StageReceipt` names. `Outcomes` tell ingest the final fate of
records. `Fate` is what each stage keeps under a key in its `seen` table.

`DeviceReceipt` is device contract v1 and is public: it has no tag and its JSON never changes.
"""

from __future__ import annotations

from typing import Any, Generic, Literal, TypeVar

import msgspec

from shared.contract import Record
from shared.contract.errors import FieldError
from shared.contract.scalars import enc_hook, stored_hook


class DeviceRef(msgspec.Struct, frozen=True):
    """Who sent a record: a device from the fleet, or `service` for the box's own records."""

    kind: str
    id: str


SERVICE_KIND = "service"


class SchemaChange(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, tag_field="type",
                   tag="schema_change"):
    """The ledger record of a contract-version activation, override or rollback (validate's own).

    `definition` and `dry_run` are operator documents (`shared.compliance.versions`), kept as given."""

    schema: str
    event_id: str
    station: str
    action: str
    version: str
    previous: str
    at: str
    command_id: str
    operator: str
    withdrawn: str | None = None
    definition: dict[str, Any] | None = None
    definition_sha256: str | None = None
    dry_run: dict[str, Any] | None = None
    reason: str | None = None

    @property
    def type(self) -> str:
        return "schema_change"


class RedriveItem(msgspec.Struct, frozen=True, omit_defaults=True):
    """One record a DLQ redrive judged again: `accepted` (on to the ledger) or still rejected
    with `rules`."""

    key: str
    event_id: str
    device_id: str
    dlq_id: int
    result: Literal["accepted", "rejected"]
    rules: list[str] | None = None


class DlqRedrive(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, tag_field="type",
                 tag="dlq_redrive"):
    """The ledger record of one DLQ redrive (validate's own, `services.validate.redrive`): who asked,
    which selection, and every record judged again with its result."""

    schema: str
    event_id: str
    station: str
    at: str
    command_id: str
    operator: str
    selection: dict[str, Any]
    selected: int
    accepted: int
    rejected: int
    items: list[RedriveItem]
    more: bool = False

    @property
    def type(self) -> str:
        return "dlq_redrive"


class _WorkSessionEntry(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, tag_field="type"):
    """A work session's ledger entry (ingest's own, `services.ingest.sessions`): who opened or
    closed which session at which place, for which work order. `command_id` and `operator`
    name the operator command that did it."""

    schema: str
    event_id: str
    station: str
    session_id: str
    place: str
    work_order_id: str
    at: str
    command_id: str
    operator: str

    @property
    def type(self) -> str:
        tag = type(self).__struct_config__.tag
        assert isinstance(tag, str)
        return tag


class WorkSessionOpened(_WorkSessionEntry, frozen=True, kw_only=True, omit_defaults=True,
                        tag="work_session_opened"):
    """The session's whole context: every record made from a read within it carries these."""

    aircraft: dict[str, str]
    ata: str
    technician: dict[str, str]
    part_action: Literal["receive", "install", "remove"]
    condition: str
    position: str | None = None
    removal_reason: str | None = None


class WorkSessionClosed(_WorkSessionEntry, frozen=True, kw_only=True, omit_defaults=True,
                        tag="work_session_closed"):
    records: int = 0


WorkSessionEntry = WorkSessionOpened | WorkSessionClosed


class ReceivedRecord(msgspec.Struct, frozen=True, tag="received/1"):
    """ingest -> validate: a record that passed device contract v1, as the device stated it, or
    a work session entry of ingest's own (device `service/ingest`)."""

    key: str
    record: Record | WorkSessionOpened | WorkSessionClosed
    received_at: str
    device: DeviceRef

    @property
    def event_id(self) -> str:
        return self.record.event_id


class ValidatedRecord(msgspec.Struct, frozen=True, tag="validated/1"):
    """validate -> sign: a record judged valid and compliant, to be appended to the ledger."""

    key: str
    record: Record | SchemaChange | DlqRedrive | WorkSessionOpened | WorkSessionClosed
    device: DeviceRef

    @property
    def event_id(self) -> str:
        return self.record.event_id


class SignedRow(msgspec.Struct, frozen=True, tag="signed/1"):
    """sign -> uplink: one ledger entry in its public export form (`shared.ledger.entry.export_row`),
    encoded once by sign and carried byte for byte to the gateway."""

    key: str
    event_id: str | None
    seq: int
    row: msgspec.Raw

    @property
    def device(self) -> None:
        """Entries are the box's: no device waits for a receipt about them."""
        return None


class FateQuery(msgspec.Struct, frozen=True, tag="query/1"):
    """A device asked again about `key`; the stage that knows the record's final fate answers it."""

    key: str
    event_id: str
    device: DeviceRef


Item = TypeVar("Item")


class Envelope(msgspec.Struct, Generic[Item]):
    """One pipeline message: a batch of one hop's items from the stage `source`."""

    source: str
    items: list[Item]


FateStatus = Literal["received", "validated", "held", "recorded", "rejected"]


class Fate(msgspec.Struct, frozen=True, omit_defaults=True, tag="fate/1"):
    """What a stage knows about a record it holds (its `seen` value): received / validated (passed
    on), held, recorded at `seq`, or rejected with `errors`.

    `redrive` counts how often a DLQ redrive judged the record again (0: never; omitted then, so
    fates written before redrive existed read the same): a redrive moves a `rejected` fate to its
    new verdict with `redrive + 1`, so a newer fate is told apart from a stale one."""

    status: FateStatus
    seq: int | None = None
    errors: list[FieldError] | None = None
    redrive: int = 0

    @property
    def final(self) -> bool:
        return self.status in ("recorded", "rejected")


class Outcome(msgspec.Struct, frozen=True, omit_defaults=True):
    """The final fate of one record, told to ingest so it can answer re-sends of it."""

    key: str
    status: Literal["recorded", "rejected"]
    seq: int | None = None
    errors: list[FieldError] | None = None
    redrive: int = 0


class Outcomes(msgspec.Struct, frozen=True, tag="outcomes/1"):
    outcomes: list[Outcome]


class StageReceipt(msgspec.Struct, frozen=True, tag="stage-receipt/1"):
    """Sent by a stage to its upstream after commit: these keys are now durable here."""

    stage: str
    keys: list[str]


class DeviceReceipt(msgspec.Struct, omit_defaults=True):
    """`mro/<station>/receipt/<device_id>` (device contract v1, public: no tag)."""

    status: str
    at: str
    event_id: str | None = None
    idempotency_key: str | None = None
    seq: int | None = None
    errors: list[FieldError] | None = None


json_encode = msgspec.json.Encoder().encode
item_encoder = msgspec.json.Encoder(enc_hook=enc_hook)
stage_receipt_decoder = msgspec.json.Decoder(StageReceipt)
outcomes_decoder = msgspec.json.Decoder(Outcomes)
fate_encode = msgspec.msgpack.Encoder().encode
fate_decode = msgspec.msgpack.Decoder(Fate).decode


def record_body(record: Record | SchemaChange | DlqRedrive | WorkSessionOpened | WorkSessionClosed) -> dict[str, Any]:
    """The canonical body of a record as it is signed (`shared.contract.normalize`, also for
    the box's own records)."""
    return msgspec.to_builtins(record, enc_hook=enc_hook)


def envelope_decoder(item_type: Any) -> msgspec.json.Decoder:
    """The decoder of a pipeline message whose items are `item_type` (a hop type or a union)."""
    return msgspec.json.Decoder(Envelope[item_type], dec_hook=stored_hook)


def encode_envelope(source: str, encoded_items: list[bytes]) -> bytes:
    """Join items already stored as JSON in the outbox without decoding them again."""
    return b'{"source":' + json_encode(source) + b',"items":[' + b",".join(encoded_items) + b"]}"
