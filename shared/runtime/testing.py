"""An in-memory unit of work for tests: the runtime's delivery logic on tables held in dicts.

    tables = MemoryTables()
    uow = MemoryUnitOfWork(Validate(), tables)
    run_batch(stage, [received], uow)        # exactly what the service does in one transaction
    uow.forwarded, uow.receipts(), uow.dlq(), tables.fate(key)

`MemoryTables` outlives one unit of work, so a test can run several batches (or "restart" a
stage) over the same state. Nothing is rolled back: a batch that raises leaves what it wrote.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import msgspec

from shared.contract.scalars import stored_hook
from shared.runtime.dlq import SUMMARY
from shared.runtime.handler import Stage
from shared.runtime.messages import DeviceReceipt, Fate, fate_decode
from shared.runtime.store import from_u64
from shared.runtime.topics import Topics
from shared.runtime.work import DLQ, SEEN, UnitOfWork

STATION = "TEST"


class MemoryTables:
    """Named ordered tables (bytes -> bytes), like one stage's LMDB store."""

    def __init__(self) -> None:
        self.tables: dict[str, dict[bytes, bytes]] = {}
        self.outbox: dict[str, bytes] = {}

    def table(self, name: str) -> dict[bytes, bytes]:
        return self.tables.setdefault(name, {})

    def fate(self, key: str) -> Fate | None:
        raw = self.table(SEEN).get(key.encode())
        return fate_decode(raw) if raw is not None else None


class MemoryUnitOfWork(UnitOfWork):
    def __init__(self, stage: Stage, tables: MemoryTables | None = None, topics: Topics | None = None,
                 dlq_budget: int | None = None):
        super().__init__(stage, topics or Topics(STATION), dlq_budget)
        self.tables = tables if tables is not None else MemoryTables()
        self.forwarded: list[bytes] = []

    def get(self, table: str, key: bytes) -> bytes | None:
        return self.tables.table(table).get(key)

    def put(self, table: str, key: bytes, value: bytes, *, append: bool = False) -> None:
        rows = self.tables.table(table)
        if append and rows and key <= max(rows):
            raise ValueError(f"append of {key!r} to {table} is not past its last key")
        rows[key] = value

    def delete(self, table: str, key: bytes) -> None:
        self.tables.table(table).pop(key, None)

    def last(self, table: str) -> tuple[bytes, bytes] | None:
        rows = self.tables.table(table)
        if not rows:
            return None
        key = max(rows)
        return key, rows[key]

    def scan(self, table: str, start: bytes = b"") -> Iterator[tuple[bytes, bytes]]:
        rows = self.tables.table(table)
        for key in sorted(k for k in rows if k >= start):
            yield key, rows[key]

    def items(self, table: str, prefix: bytes = b"") -> list[tuple[bytes, bytes]]:
        return sorted((k, v) for k, v in self.tables.table(table).items() if k.startswith(prefix))

    def owe(self, key: str, encoded_item: bytes) -> None:
        if key in self.tables.outbox:
            return
        self.tables.outbox[key] = encoded_item
        self.forwarded.append(encoded_item)

    # what a test looks at
    def forwarded_as(self, item_type: Any) -> list[Any]:
        """The records owed downstream in this unit of work, decoded as the next hop's type."""
        return [msgspec.json.decode(raw, type=item_type, dec_hook=stored_hook) for raw in self.forwarded]

    def receipts(self) -> list[tuple[str, DeviceReceipt]]:
        """(device id, receipt) in the order they would be published."""
        prefix = self.topics.receipt("")
        return [(topic[len(prefix):], msgspec.json.decode(payload, type=DeviceReceipt))
                for topic, payload, _, _ in self.outgoing if topic.startswith(prefix)]

    def dlq(self) -> list[dict[str, Any]]:
        return [json.loads(value) for _, value in sorted(self.tables.table(DLQ).items())]

    def dlq_summary(self) -> dict[tuple[str, str], int]:
        """(device id, rule) -> reports counted but not stored whole."""
        counts: dict[tuple[str, str], int] = {}
        for key, value in self.tables.table(SUMMARY).items():
            device_id, _, rule = key.decode().partition("\0")
            counts[(device_id, rule)] = from_u64(value)
        return counts

    def meta(self, name: str) -> int:
        raw = self.tables.table("meta").get(name.encode())
        return from_u64(raw) if raw else 0

    def states(self) -> list[tuple[str | None, str]]:
        return [(t.correlation_id, t.state) for t in self.transitions]
