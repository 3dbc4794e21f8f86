"""The unit of work: what a handler may do inside one batch transaction.

Reads and writes of the stage's own tables, notes for the log, messages to publish after the
commit, records the stage originates itself (`forward`) and verdicts on records settled
outside `judge` (`settle`, e.g. held records released by an operator command). Everything
that leaves the process leaves after the commit.

`UnitOfWork` keeps the delivery logic independent of where the tables live:
`LmdbUnitOfWork` is the service's (one synced LMDB write transaction), and
`shared.runtime.testing.MemoryUnitOfWork` keeps them in dicts for tests.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import lmdb

from shared.runtime import delivery, dlq, retention
from shared.runtime.dlq import DLQ
from shared.runtime.messages import (
    DeviceRef,
    Fate,
    Outcome,
    Outcomes,
    fate_decode,
    fate_encode,
    item_encoder,
    json_encode,
)
from shared.runtime.outbox import Outbox
from shared.runtime.store import Store
from shared.runtime.topics import Topics
from shared.runtime.verdicts import Verdict

if TYPE_CHECKING:
    from shared.contract.errors import FieldError
    from shared.runtime.handler import Stage

SEEN = "seen"
__all__ = ["DLQ", "SEEN", "LmdbUnitOfWork", "Transition", "UnitOfWork"]


@dataclass
class Transition:
    correlation_id: str | None
    key: str | None
    state: str
    extra: dict[str, Any]


class UnitOfWork(ABC):
    """`dlq_budget`: bytes the stage's `dlq` table may hold (`shared.runtime.dlq`); None: no limit."""

    def __init__(self, stage: Stage, topics: Topics, dlq_budget: int | None = None):
        self.stage = stage
        self.topics = topics
        self.dlq_budget = dlq_budget
        self.outgoing: list[tuple[str, bytes, int, bool]] = []
        self.transitions: list[Transition] = []
        self.outcomes: list[Outcome] = []
        self.processed = 0
        self.failed = 0
        self.passed = 0  # accepted or recorded: sent on (the status's records.out)
        self.duplicates = 0  # inputs whose key already had a fate

    # storage (the stage's tables and the runtime's)
    @abstractmethod
    def get(self, table: str, key: bytes) -> bytes | None: ...

    @abstractmethod
    def put(self, table: str, key: bytes, value: bytes, *, append: bool = False) -> None: ...

    @abstractmethod
    def delete(self, table: str, key: bytes) -> None: ...

    @abstractmethod
    def last(self, table: str) -> tuple[bytes, bytes] | None: ...

    @abstractmethod
    def scan(self, table: str, start: bytes = b"") -> Iterator[tuple[bytes, bytes]]:
        """The rows of `table` from key `start` on, in key order (do not write `table` meanwhile)."""

    @abstractmethod
    def items(self, table: str, prefix: bytes = b"") -> list[tuple[bytes, bytes]]:
        """The rows of a small table whose key starts with `prefix`, in key order."""

    @abstractmethod
    def owe(self, key: str, encoded_item: bytes) -> None:
        """An outbox row for the downstream stage (a no-op while `key` is still owed)."""

    # fates: the runtime's dedupe state, one typed value per idempotency key
    def fate(self, key: str) -> Fate | None:
        raw = self.get(SEEN, key.encode())
        return fate_decode(raw) if raw is not None else None

    def set_fate(self, key: str, fate: Fate) -> None:
        """Store the key's fate; its first one also gets its age (`retention.SEEN_AGE`), from
        which the pruner tells when the dedupe window has passed."""
        bkey = key.encode()
        if self.get(SEEN, bkey) is None:
            self.put(retention.SEEN_AGE, retention.age_key(retention.now_s(), bkey), b"")
        self.put(SEEN, bkey, fate_encode(fate))

    def keep_report(self, report: dict[str, Any], device: DeviceRef | None, errors: list[FieldError], *,
                    record: Any = None, redrive: int = 0) -> bool:
        """Store the report (and `record`, for a redrive) in the DLQ within its budget, or count it
        (`shared.runtime.dlq`)."""
        return dlq.keep(self, report, device, errors, self.dlq_budget, record=record, redrive=redrive)

    # what handlers use
    def forward(self, output: Any) -> None:
        """Owe a record the stage originates itself (a schema change, a key rotation) downstream."""
        self.owe(output.key, item_encoder.encode(output))

    def settle(self, item: Any, verdict: Verdict, *, redrive: int = 0) -> None:
        """Act on a verdict reached outside `judge` (a held record released, a DLQ record redriven
        as generation `redrive`) exactly as on one from it."""
        delivery.settle(self, item, verdict, redrive=redrive)

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        self.outgoing.append((topic, payload, qos, retain))

    def note(self, correlation_id: str | None, key: str | None, state: str, **extra: Any) -> None:
        """A state change for the log (written after commit); not counted as processed."""
        self.transitions.append(Transition(correlation_id, key, state, extra))

    def messages(self) -> list[tuple[str, bytes, int, bool]]:
        """What to publish once the transaction has committed: the stage's messages, then one
        outcome notice for every final fate reached in it."""
        if not self.outcomes:
            return self.outgoing
        return [*self.outgoing, (self.topics.outcomes, json_encode(Outcomes(self.outcomes)), 1, False)]


class LmdbUnitOfWork(UnitOfWork):
    """The service's unit of work: one synced LMDB write transaction of the stage's store."""

    def __init__(self, stage: Stage, topics: Topics, store: Store, txn: lmdb.Transaction,
                 outbox: Outbox | None, dlq_budget: int | None = None):
        super().__init__(stage, topics, dlq_budget)
        self._store = store
        self._txn = txn
        self._outbox = outbox

    def get(self, table: str, key: bytes) -> bytes | None:
        return self._txn.get(key, db=self._store.table(table))

    def put(self, table: str, key: bytes, value: bytes, *, append: bool = False) -> None:
        self._txn.put(key, value, db=self._store.table(table), append=append)

    def delete(self, table: str, key: bytes) -> None:
        self._txn.delete(key, db=self._store.table(table))

    def last(self, table: str) -> tuple[bytes, bytes] | None:
        cursor = self._txn.cursor(db=self._store.table(table))
        return (cursor.key(), cursor.value()) if cursor.last() else None

    def scan(self, table: str, start: bytes = b"") -> Iterator[tuple[bytes, bytes]]:
        cursor = self._txn.cursor(db=self._store.table(table))
        if cursor.set_range(start):
            yield from cursor.iternext()

    def items(self, table: str, prefix: bytes = b"") -> list[tuple[bytes, bytes]]:
        cursor = self._txn.cursor(db=self._store.table(table))
        rows: list[tuple[bytes, bytes]] = []
        if not cursor.set_range(prefix):
            return rows
        for key, value in cursor:
            if not bytes(key).startswith(prefix):
                break
            rows.append((bytes(key), bytes(value)))
        return rows

    def owe(self, key: str, encoded_item: bytes) -> None:
        if self._outbox is None:
            raise RuntimeError(f"the {self.stage.name} stage has no downstream to forward {key} to")
        self._outbox.add(self._txn, key, encoded_item)

    def settle_receipts(self, keys: list[str]) -> list[int]:
        """Free the outbox rows a downstream receipt names; their ids go to `Outbox.forget` after commit."""
        return self._outbox.settle(self._txn, keys) if self._outbox and keys else []
