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

LMDB reuses the pages a transaction freed only once a later transaction has committed. After
ingest drained a full spool, the commit that deleted its entries freed nearly the whole map, and
every append after it failed (MapFullError) and rolled back, so no later commit ever came and
intake stalled for good. A commit that hits the map's end therefore first commits the spool's
`next_seq` on its own, which makes those pages reusable, and tries once more. `next_seq` is
kept in every append, so seqs never repeat, even after a restart with an empty spool.

The map grows at run time (`shared.runtime.store`): an append that would leave less than
HEADROOM of the map free grows the map first, and only at its cap (`stage.spool_map_max_mb`) is
the spool full; a write that hits the map's end anyway (it grew meanwhile, or freed pages are
not reusable yet) is tried once more after the small release commit, as above.

Beyond the map, the data directory's storage budget (`[storage]`, `shared.runtime.budget`)
refuses appends: at the budget, at the intake class's share, or with the filesystem nearly
full, `commit` raises SpoolFull before writing, so the broker sends no PUBACK and the device
keeps its record; deletes still commit, and appends resume once a measurement finds room.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import lmdb
import msgspec

from shared.runtime.store import MIB, Store, from_u64, u64

TABLE = "intake"
META = "meta"
NEXT_SEQ = b"next_seq"

HEADROOM = 0.15  # of the map kept free, so that deleting (copy-on-write) is always possible
CAP_REREAD_S = 5.0  # a spool full at its cap reads `stage.spool_map_max_mb` again this often


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

    def __init__(self, path: Path, map_size_mb: int, map_max_mb: int | None = None,
                 cap_source: Callable[[], int | None] | None = None,
                 refusal: Callable[[], str | None] | None = None) -> None:
        """`cap_source`: reads the cap (MiB) again when the spool is full at it (None: unreadable).
        `refusal`: why no new entry may be appended now (the storage budget, `shared.runtime.budget`),
        or None; deletes are always accepted, they are what frees room."""
        self._refusal = refusal
        self.store = Store(path, (TABLE, META), map_size_mb=map_size_mb, map_max_mb=map_max_mb)
        self._cap_source = cap_source
        self._table = self.store.table(TABLE)
        self._meta = self.store.table(META)
        with self.store.read() as txn:
            cursor = txn.cursor(db=self._table)
            after_last = from_u64(cursor.key()) + 1 if cursor.last() else 1
            recorded = txn.get(NEXT_SEQ, db=self._meta)
            self.next_seq = max(after_last, from_u64(recorded) if recorded else 1)
            self.depth = txn.stat(self._table)["entries"]
        self._page_size = self.store.env.stat()["psize"]
        self._cap_read_at = 0.0

    def _pages_used(self) -> int:
        with self.store.read() as txn:
            stat = txn.stat(self._table)
        return stat["branch_pages"] + stat["leaf_pages"] + stat["overflow_pages"]

    def commit(self, entries: list[SpoolEntry], deletes: list[int]) -> list[int]:
        """One synced transaction: append `entries` (returns their seqs) and drop `deletes`.
        Raises SpoolFull near the map's end, or lmdb.Error (a full disk), with nothing changed."""
        if entries and self._refusal is not None and (reason := self._refusal()) is not None:
            raise SpoolFull(f"intake refused: {reason}")
        if entries and not self._room():
            raise SpoolFull(f"intake spool at {self.store.path} is full (stage.spool_map_max_mb)")
        try:
            removed = self._write(entries, deletes)
        except lmdb.MapFullError:
            self._release_freed_pages()
            removed = self._write(entries, deletes)
        seqs = list(range(self.next_seq, self.next_seq + len(entries)))
        self.next_seq += len(entries)
        self.depth += len(entries) - removed
        return seqs

    def _room(self) -> bool:
        """More than HEADROOM of the map is free, after growing it if need be (up to its cap)."""
        while self._pages_used() > (1 - HEADROOM) * (self.store.map_size // self._page_size):
            if not self.store.grow() and not (self._cap_raised() and self.store.grow()):
                return False
        return True

    def _cap_raised(self) -> bool:
        """Full at the cap: read the cap again (`cap_source`, at most every CAP_REREAD_S), so that
        raising it lets intake go on without a broker restart."""
        if self._cap_source is None or time.monotonic() - self._cap_read_at < CAP_REREAD_S:
            return False
        self._cap_read_at = time.monotonic()
        cap_mb = self._cap_source()
        if cap_mb is None:
            return False
        cap = cap_mb * MIB
        raised = cap > self.store.max_bytes
        self.store.max_bytes = max(cap, self.store.map_size)
        return raised

    def _write(self, entries: list[SpoolEntry], deletes: list[int]) -> int:
        """The transaction itself; returns how many of `deletes` were present."""
        removed = 0
        with self.store.write() as txn:
            for seq in deletes:
                removed += txn.delete(u64(seq), db=self._table)
            for seq, entry in enumerate(entries, start=self.next_seq):
                txn.put(u64(seq), _encode(entry), db=self._table, append=True)
            if entries:
                txn.put(NEXT_SEQ, u64(self.next_seq + len(entries)), db=self._meta)
        return removed

    def _release_freed_pages(self) -> None:
        """A small commit of its own, after which LMDB may reuse what the last commit freed."""
        with self.store.write() as txn:
            txn.put(NEXT_SEQ, u64(self.next_seq), db=self._meta)

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

