"""Internal stage traffic on `mro/<station>/pipeline/...` and device receipts.

Pipeline messages carry many records each (a batch from the upstream outbox). Each record
travels with its idempotency key, which is also what a downstream receipt names.
"""

from __future__ import annotations

from typing import Any

import msgspec

from shared.runtime.clock import utc_from_epoch, utc_now

__all__ = ["utc_from_epoch", "utc_now"]  # re-exported until every caller imports shared.runtime.clock


class Item(msgspec.Struct, frozen=True):
    """One record between stages: its idempotency key and the stage-specific data."""

    key: str
    data: dict[str, Any]


class Envelope(msgspec.Struct):
    source: str
    items: list[Item]


class StageReceipt(msgspec.Struct):
    """Sent by a stage to its upstream after commit: these keys are now durable here."""

    stage: str
    keys: list[str]


class DeviceReceipt(msgspec.Struct, omit_defaults=True):
    """`mro/<station>/receipt/<device_id>` (device contract v1)."""

    status: str
    at: str
    event_id: str | None = None
    idempotency_key: str | None = None
    seq: int | None = None
    errors: list[dict[str, Any]] | None = None


class Outcome(msgspec.Struct, omit_defaults=True):
    """Final fate of a record, told to ingest so it can answer re-sends of it."""

    key: str
    status: str
    seq: int | None = None
    errors: list[dict[str, Any]] | None = None


class Outcomes(msgspec.Struct):
    outcomes: list[Outcome]


json_encode = msgspec.json.Encoder().encode
item_encoder = msgspec.json.Encoder()
envelope_decoder = msgspec.json.Decoder(Envelope)
stage_receipt_decoder = msgspec.json.Decoder(StageReceipt)
outcomes_decoder = msgspec.json.Decoder(Outcomes)


def encode_envelope(source: str, encoded_items: list[bytes]) -> bytes:
    """Join items already stored as JSON in the outbox without decoding them again."""
    return b'{"source":' + json_encode(source) + b',"items":[' + b",".join(encoded_items) + b"]}"
