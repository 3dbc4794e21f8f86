"""The uplink's LMDB store (`$MRO_DATA_DIR/uplink`): the one module that knows its layout.

Tables, beside the stage runtime's own (`seen`, `meta`, the outbox):

- ``entries``   u64(seq) -> ledger export row (JSON), waiting for the gateway to hold it;
- ``progress``  what the gateway has confirmed, by key:
  ``acknowledged_count`` u64: entries the gateway acknowledged (it holds seq 0 .. count - 1);
  ``cosigned_checkpoint`` the newest checkpoint note the gateway cosigned (the box's receipt);
  ``cosigned_size`` u64: the tree size of that checkpoint.

The stage handler queues rows through its unit of work (table ``ENTRIES``); the pusher thread
writes everything else through `UplinkStore`. Other processes read the acknowledged count with
`acknowledged_count(config)` (the sign stage refuses a ledger behind it) and the gateway's receipt with
`gateway_receipt(config)` (`mro-edge ledger archive` archives only what it covers), never by table name.
"""

from __future__ import annotations

from collections.abc import Iterable

import lmdb
import msgspec

from shared.runtime.config import Config
from shared.runtime.store import Store, StoreError, from_u64, u64

UPLINK_STAGE = "uplink"
ENTRIES = "entries"
PROGRESS = "progress"
UPLINK_TABLES = (ENTRIES, PROGRESS)
ACKNOWLEDGED_COUNT = b"acknowledged_count"
COSIGNED_CHECKPOINT = b"cosigned_checkpoint"
COSIGNED_SIZE = b"cosigned_size"


class UplinkStore:
    """Reads and writes of the uplink's tables, on the store the stage runtime opened."""

    def __init__(self, store: Store):
        self.store = store

    def _progress(self, key: bytes) -> int:
        with self.store.read() as txn:
            raw = txn.get(key, db=self.store.table(PROGRESS))
        return from_u64(raw) if raw else 0

    def acknowledged_count(self) -> int:
        return self._progress(ACKNOWLEDGED_COUNT)

    def cosigned_size(self) -> int:
        return self._progress(COSIGNED_SIZE)

    def queued(self) -> int:
        return self.store.count(ENTRIES)

    def contiguous_rows(self, first: int, limit: int) -> list[bytes]:
        """Rows of seq `first`, `first` + 1, ... up to `limit` of them, stopping at a gap."""
        rows: list[bytes] = []
        with self.store.read() as txn:
            cursor = txn.cursor(db=self.store.table(ENTRIES))
            if cursor.set_range(u64(first)):
                for key, value in cursor:
                    if from_u64(key) != first + len(rows) or len(rows) >= limit:
                        break
                    rows.append(value)
        return rows

    def acknowledge(self, count: int) -> None:
        """The gateway holds the first `count` entries: store that, and drop them, atomically."""
        with self.store.write() as txn:
            txn.put(ACKNOWLEDGED_COUNT, u64(count), db=self.store.table(PROGRESS))
            self._drop_below(txn, count)

    def drop_acknowledged(self, count: int) -> None:
        """Drop rows the gateway already holds that were queued after their ack was stored."""
        with self.store.read() as txn:
            cursor = txn.cursor(db=self.store.table(ENTRIES))
            stale = cursor.first() and from_u64(cursor.key()) < count
        if stale:
            with self.store.write() as txn:
                self._drop_below(txn, count)

    def requeue(self, rows: Iterable[tuple[int, bytes]], count: int) -> None:
        """The gateway lost entries it had acknowledged: queue `rows` (seq, row) again and move
        the acknowledged count back to the `count` it still holds, atomically."""
        with self.store.write() as txn:
            for seq, row in rows:
                txn.put(u64(seq), row, db=self.store.table(ENTRIES))
            txn.put(ACKNOWLEDGED_COUNT, u64(count), db=self.store.table(PROGRESS))

    def record_cosigned(self, note: str, size: int) -> None:
        with self.store.write() as txn:
            txn.put(COSIGNED_CHECKPOINT, note.encode("utf-8"), db=self.store.table(PROGRESS))
            txn.put(COSIGNED_SIZE, u64(size), db=self.store.table(PROGRESS))

    def _drop_below(self, txn: lmdb.Transaction, count: int) -> None:
        cursor = txn.cursor(db=self.store.table(ENTRIES))
        if cursor.first():
            while (key := cursor.key()) and from_u64(key) < count:
                if not cursor.delete():
                    break


def acknowledged_count(config: Config) -> int:
    """Entries the gateway has acknowledged, read from another process; 0 if unknown (the
    uplink has not run, or not yet stored an acknowledgement)."""
    path = config.stage_dir(UPLINK_STAGE)
    if not (path / "data.mdb").exists():
        return 0
    try:
        store = Store(path, (PROGRESS,), readonly=True)
    except (StoreError, lmdb.Error):
        return 0
    try:
        with store.read() as txn:
            raw = txn.get(ACKNOWLEDGED_COUNT, db=store.table(PROGRESS))
    except lmdb.Error:
        return 0
    finally:
        store.close()
    return from_u64(raw) if raw and len(raw) == 8 else 0


class GatewayReceipt(msgspec.Struct, frozen=True):
    """What the gateway confirmed, read from another process: it holds seq 0..acknowledged-1 and
    cosigned the checkpoint ``cosigned_note`` over the first ``cosigned_size`` entries."""

    acknowledged: int
    cosigned_size: int
    cosigned_note: bytes | None


def gateway_receipt(config: Config) -> GatewayReceipt:
    """The acknowledged count and the newest cosigned checkpoint (zeros if the uplink never stored any)."""
    path = config.stage_dir(UPLINK_STAGE)
    if not (path / "data.mdb").exists():
        return GatewayReceipt(0, 0, None)
    try:
        store = Store(path, (PROGRESS,), readonly=True)
    except (StoreError, lmdb.Error):
        return GatewayReceipt(0, 0, None)
    try:
        with store.read() as txn:
            db = store.table(PROGRESS)
            raw = [txn.get(key, db=db) for key in (ACKNOWLEDGED_COUNT, COSIGNED_SIZE, COSIGNED_CHECKPOINT)]
    except lmdb.Error:
        return GatewayReceipt(0, 0, None)
    finally:
        store.close()
    acked, size, note = raw
    return GatewayReceipt(from_u64(acked) if acked and len(acked) == 8 else 0,
                          from_u64(size) if size and len(size) == 8 else 0,
                          bytes(note) if note else None)
