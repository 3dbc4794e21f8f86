"""A stage's dead-letter store: error reports kept within a byte budget, only counted beyond it.

Bad input must not fill the disk or freeze intake, so the `dlq` table has a budget per stage
(`[stage] dlq_budget_kb`). Every stored row is bounded: the raw message is cut to
`[limits] max_raw_in_report` bytes by the report itself, and a row keeps at most ROW_ERRORS
errors (the rest are counted in `errors_omitted`; the device's receipt and the DLQ topic still
get them all). While the budget has room a report is stored whole. Once it is reached, the
rejection is still answered (receipt, DLQ topic) but only counted: per device and rule in
`dlq_summary`, and in total in `dlq_dropped`; the first report not stored raises one
`dlq_full` alarm (again only after the DLQ has had room, e.g. under a larger budget).
Rejections that are never stored whole (`rate_limited`) are counted the same way. Good
records never wait for any of this.

Redrive (`mro-edge dlq redrive`, `services.validate.redrive`): a stage whose rejections are of
decoded records (`Stage.keeps_rejected`: validate) keeps the whole typed record in the row
(`record`, a `ReceivedRecord`, bounded by the contract's size limit), so it can be judged again
once its cause is fixed; `redrive` is the generation of the verdict that stored the row. A
report only counted (budget reached) keeps no record and cannot be redriven. Ingest's rejections
are of messages that never decoded: they keep only the capped raw prefix and are not redrivable.

Tables owned here (other code uses `usage` and `summary`):

* `dlq`: u64 sequence -> the encoded report, with `record` and `redrive` where kept
  (`mro-edge dlq list`, `Row`);
* `dlq_summary`: device id NUL rule -> u64 count of reports not stored whole, at most
  SUMMARY_ROWS rows (further devices count under `*`);
* in `meta`: `dlq_next` (the next row id: ids are never reused), `dlq_bytes` (bytes of the
  `dlq` table's keys and values, the number an operator or a whole-box storage budget reads),
  `dlq_dropped` (reports counted only), `dlq_full` (the alarm was raised).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import msgspec

from shared.runtime.alarms import alarm_payload
from shared.runtime.messages import DeviceRef, item_encoder, json_encode
from shared.runtime.store import Store, StoreError, from_u64, u64

if TYPE_CHECKING:
    from shared.contract.errors import FieldError
    from shared.runtime.work import UnitOfWork

DLQ, SUMMARY, META = "dlq", "dlq_summary", "meta"
TABLES = (DLQ, SUMMARY)
ROW_ERRORS = 20
SUMMARY_ROWS = 10_000
ANY_DEVICE = "*"
_BYTES, _DROPPED, _FULL, _SUMMARY_ROWS = b"dlq_bytes", b"dlq_dropped", b"dlq_full", b"dlq_summary_rows"
_NEXT = b"dlq_next"
_KEY_BYTES = 8


class Row(msgspec.Struct, frozen=True):
    """What a redrive reads of a stored row (the report's other fields stay as they are)."""

    stage: str
    received_at: str = ""
    errors: list[dict[str, Any]] = msgspec.field(default_factory=list)
    event_id: str | None = None
    idempotency_key: str | None = None
    record: msgspec.Raw = msgspec.Raw(b"")  # empty: no record kept (not redrivable)
    redrive: int = 0

    @property
    def rules(self) -> list[str]:
        return sorted({str(error.get("rule")) for error in self.errors})


decode_row = msgspec.json.Decoder(Row).decode


class Usage(msgspec.Struct, frozen=True):
    """What a stage's DLQ holds: `bytes` against `budget`, `rows`, and reports `dropped` (counted only)."""

    rows: int
    bytes: int
    dropped: int


def stored_form(report: dict[str, Any]) -> dict[str, Any]:
    """The report as the `dlq` row keeps it: at most ROW_ERRORS errors, the rest counted."""
    errors = report.get("errors") or []
    if len(errors) <= ROW_ERRORS:
        return report
    return {**report, "errors": errors[:ROW_ERRORS], "errors_omitted": len(errors) - ROW_ERRORS}


def keep(uow: UnitOfWork, report: dict[str, Any], device: DeviceRef | None, errors: list[FieldError],
         budget: int | None, *, record: Any = None, redrive: int = 0) -> bool:
    """Store `report` if the budget (bytes, None: none) has room; else count it. True if stored.
    `record` (a hop message) is kept whole in the row for a redrive; `redrive` is its generation."""
    row = stored_form(report)
    if record is not None:
        row = {**row, "record": msgspec.Raw(item_encoder.encode(record))}
    if redrive:
        row = {**row, "redrive": redrive}
    encoded = json_encode(row)
    used = _counter(uow, _BYTES)
    size = len(encoded) + _KEY_BYTES
    if budget is None or used + size <= budget:
        last = uow.last(DLQ)
        row_id = max(from_u64(last[0]) + 1 if last else 0, _counter(uow, _NEXT))
        uow.put(DLQ, u64(row_id), encoded, append=True)
        uow.put(META, _NEXT, u64(row_id + 1))  # ids are never reused, even once redrive empties the DLQ
        _add(uow, _BYTES, size)
        if uow.get(META, _FULL) is not None:
            uow.delete(META, _FULL)  # room again: the next time it fills is worth an alarm
        return True
    count(uow, device, (e.rule for e in errors))
    if not _counter(uow, _FULL):
        _add(uow, _FULL, 1)
        detail = (f"the {uow.stage.name} DLQ is at its budget ({used} of {budget} bytes): further rejections "
                  f"are still answered and published, but only counted per device and rule "
                  f"(mro-edge dlq summary); find the device sending them, or raise [stage] dlq_budget_kb")
        uow.publish(uow.topics.alarm, alarm_payload(uow.stage.name, "dlq_full", detail, dlq_bytes=used,
                                                    budget_bytes=budget))
    return False


def remove(uow: UnitOfWork, row_id: int) -> None:
    """Delete one stored row (redriven: accepted, or replaced by its new report) and free its bytes."""
    key = u64(row_id)
    raw = uow.get(DLQ, key)
    if raw is None:
        return
    uow.delete(DLQ, key)
    _add(uow, _BYTES, -min(len(raw) + _KEY_BYTES, _counter(uow, _BYTES)))


def remove_in(txn: Any, store: Store, row_id: int) -> None:
    """`remove` in a plain write transaction of `store` (the pruner's, `shared.runtime.prune`)."""
    key, rows, meta = u64(row_id), store.table(DLQ), store.table(META)
    raw = txn.get(key, db=rows)
    if raw is None:
        return
    txn.delete(key, db=rows)
    used = txn.get(_BYTES, db=meta)
    used_bytes = from_u64(used) if used else 0
    txn.put(_BYTES, u64(used_bytes - min(len(raw) + _KEY_BYTES, used_bytes)), db=meta)


def rows(store: Store) -> list[tuple[int, bytes]]:
    """(id, encoded row) of every stored row, in id order (`mro-edge dlq export`)."""
    with store.read() as txn:
        return [(from_u64(key), bytes(value)) for key, value in txn.cursor(db=store.table(DLQ))]


def count(uow: UnitOfWork, device: DeviceRef | None, rules: Iterable[str]) -> None:
    """Count one report not stored whole, once per distinct rule, under its device."""
    device_id = device.id if device is not None else ""
    for rule in sorted(set(rules)):
        key = f"{device_id}\0{rule}".encode()
        raw = uow.get(SUMMARY, key)
        if raw is None and _counter(uow, _SUMMARY_ROWS) >= SUMMARY_ROWS:
            key = f"{ANY_DEVICE}\0{rule}".encode()
            raw = uow.get(SUMMARY, key)
        if raw is None:
            _add(uow, _SUMMARY_ROWS, 1)
        uow.put(SUMMARY, key, u64((from_u64(raw) if raw else 0) + 1))
    _add(uow, _DROPPED, 1)


def _counter(uow: UnitOfWork, name: bytes) -> int:
    raw = uow.get(META, name)
    return from_u64(raw) if raw else 0


def _add(uow: UnitOfWork, name: bytes, delta: int) -> None:
    uow.put(META, name, u64(_counter(uow, name) + delta))


# the read API (status, `mro-edge dlq`, tests)
def usage(store: Store) -> Usage:
    with store.read() as txn:
        meta = store.table(META)
        values = [txn.get(name, db=meta) for name in (_BYTES, _DROPPED)]
        rows = txn.stat(store.table(DLQ))["entries"]
    used, dropped = (from_u64(v) if v else 0 for v in values)
    return Usage(rows, used, dropped)


def summary(store: Store) -> list[tuple[str, str, int]]:
    """(device id, rule, count) of every report counted but not stored, by device then rule."""
    try:
        table = store.table(SUMMARY)
    except KeyError:
        raise StoreError("this store has no DLQ summary (opened without its table)") from None
    with store.read() as txn:
        rows = []
        for key, value in txn.cursor(db=table):
            device_id, _, rule = bytes(key).decode().partition("\0")
            rows.append((device_id, rule, from_u64(value)))
    return rows
