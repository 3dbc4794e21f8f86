"""The intake spool: device publishes on `mro/<station>/in/...`, durable before they are PUBACKed.

The only owner of the LMDB store under `$MRO_DATA_DIR/spool/`. The broker appends a whole
group of publishes (from every connection) in one synced transaction and only then sends
their PUBACKs, so a PUBACK on an `in` topic means "on disk": a kill -9 of any process or a
power cut cannot lose it. Entries are delivered to the ingest service's session in spool
order and deleted once ingest has acknowledged them, which ingest does only after its own
commit. An entry delivered but not yet deleted is delivered again after a restart: ingest
answers that as a re-send (content idempotency key), so nothing is recorded twice.

Reads and writes both run on the broker's event loop: a synced commit costs well under a
millisecond on this class of disk, and handing it to a thread cost more (GIL hand-offs of up to
the 5 ms switch interval) than it saved.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import msgspec

from shared.runtime.store import Store, from_u64, u64

TABLE = "intake"


HEADROOM = 0.15  # of the map kept free, so that deleting (copy-on-write) is always possible


class SpoolFull(Exception):
    """The spool holds as much as its map may take; only deletes are accepted until it drains."""


class SpoolEntry(msgspec.Struct, array_like=True):
    topic: str
    payload: bytes
    received_at: float


_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(SpoolEntry).decode


@dataclass(slots=True)
class Spooled:
    seq: int
    entry: SpoolEntry


class Spool:
    """Append in groups, read in order, delete what the consumer acknowledged."""

    def __init__(self, path: Path, map_size_mb: int) -> None:
        self.store = Store(path, (TABLE,), map_size_mb=map_size_mb)
        self._table = self.store.table(TABLE)
        with self.store.read() as txn:
            cursor = txn.cursor(db=self._table)
            self.next_seq = from_u64(cursor.key()) + 1 if cursor.last() else 1
            self.depth = txn.stat(self._table)["entries"]
        info = self.store.env.info()
        self._map_pages = info["map_size"] // self.store.env.stat()["psize"]

    def _pages_used(self) -> int:
        with self.store.read() as txn:
            stat = txn.stat(self._table)
        return stat["branch_pages"] + stat["leaf_pages"] + stat["overflow_pages"]

    def commit(self, entries: list[SpoolEntry], deletes: list[int]) -> list[int]:
        """One synced transaction: append `entries` (returns their seqs) and drop `deletes`.
        Raises SpoolFull near the map's end, or lmdb.Error (a full disk), with nothing changed."""
        if entries and self._pages_used() > (1 - HEADROOM) * self._map_pages:
            raise SpoolFull(f"intake spool at {self.store.path} is full")
        seqs = list(range(self.next_seq, self.next_seq + len(entries)))
        removed = 0
        with self.store.write() as txn:
            for seq in deletes:
                removed += txn.delete(u64(seq), db=self._table)
            for seq, entry in zip(seqs, entries):
                txn.put(u64(seq), _encode(entry), db=self._table, append=True)
        self.next_seq += len(entries)
        self.depth += len(entries) - removed
        return seqs

    def read_after(self, seq: int, limit: int) -> list[Spooled]:
        """Up to `limit` entries with a seq above `seq`, in order."""
        found: list[Spooled] = []
        with self.store.read() as txn:
            cursor = txn.cursor(db=self._table)
            if not cursor.set_range(u64(seq + 1)):
                return found
            for key, value in cursor:
                found.append(Spooled(from_u64(key), _decode(value)))
                if len(found) >= limit:
                    break
        return found

    def close(self) -> None:
        self.store.close()

