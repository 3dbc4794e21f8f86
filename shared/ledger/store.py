"""Where the signed ledger lives: the sign stage's LMDB, and the last checkpoint kept beside the keys.

Tables of ``$MRO_DATA_DIR/sign`` (one environment, one writer: the sign service):

- ``ledger``       u64(seq) -> SignedEntry (msgpack): the entries, in seq order;
- ``merkle``       the RFC 6962 tree over the entries (``shared.ledger.merkle``), written in the same
                   transaction as each append;
- ``checkpoints``  u64(size) -> signed C2SP checkpoint note (bytes), written after the commit
                   of the entries it covers;
- ``archived``     u64(n) -> ``ArchivedBase`` (msgpack): ``mro-edge ledger archive`` moved the entries
                   0..n-1 to a verified archive and deleted them here (``shared.ledger.archive``). The
                   ledger table then starts at seq n; the Merkle table keeps the compact range of
                   [0, n) (``shared.ledger.frontier``), so roots and proofs at every size >= n still
                   compute; every checkpoint stays.

``$MRO_DATA_DIR/keys/checkpoint.latest`` repeats the newest signed checkpoint outside the LMDB
file, so that restoring an old copy of the store (a backup, an SD-card image, a VM snapshot)
does not also restore an old checkpoint: the sign service compares the two on start.

The sign service is the writer; the one exception is ``mro-edge ledger archive``, which writes the
``archived`` row and deletes archived rows through ``LedgerPruner`` in short transactions (LMDB
serializes writers across processes, so the sign service appends meanwhile).

This module is the one owner of that layout. Other processes read through ``LedgerReader``
(``open_ledger(config)``): ``head()``, ``size()``, ``root()``, ``entries(from_seq)``,
``checkpoint_at_most(size)``, ``latest_checkpoint()``, or several answers from one snapshot
with ``snapshot()``; entries are streamed with a cursor, never loaded all at once.

The sign service grows the store's map as the ledger grows (``shared.runtime.store``, capped by
``stage.ledger_map_max_mb``); a ``LedgerReader`` in another process follows by itself (its next
read adopts the new size). ``copy_to`` is the consistent copy ``mro-edge backup`` takes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import lmdb
import msgspec

from shared.ledger.entry import SignedEntry
from shared.ledger.merkle import MERKLE_TABLE, MerkleTree, lmdb_tree
from shared.runtime.config import Config
from shared.runtime.files import write_atomic
from shared.runtime.store import MIB, MapGrown, Store, StoreError, TxnGate, from_u64, u64

LEDGER_TABLE = "ledger"
CHECKPOINTS_TABLE = "checkpoints"
ARCHIVED_TABLE = "archived"
SIGN_TABLES = (LEDGER_TABLE, MERKLE_TABLE, CHECKPOINTS_TABLE, ARCHIVED_TABLE)
SIGN_STAGE = "sign"
LATEST_CHECKPOINT_FILE = "checkpoint.latest"

encode_entry = msgspec.msgpack.Encoder().encode
decode_entry = msgspec.msgpack.Decoder(SignedEntry).decode


class ArchivedBase(msgspec.Struct, frozen=True, kw_only=True):
    """Where the ledger held on the box starts after ``mro-edge ledger archive``: entries 0..n-1
    are in the archive ``archive`` (whose ``MANIFEST.sha256`` hashes to ``manifest_sha256``).

    ``prev`` is the hash of entry n-1 (entry n links to it), ``root`` the Merkle root at n and
    ``frontier`` the compact range at n (hex, largest subtree first): with them the retained
    entries verify on their own and continue the archive's chain and tree. ``recorded_seq`` is the
    seq of the ``ledger_archived`` entry the sign service appended for it (None until then).
    """

    n: int
    prev: str
    root: str
    frontier: list[str]
    archive: str
    manifest_sha256: str
    operator: str
    archived_at: str
    first: int = 0
    recorded_seq: int | None = None


encode_base = msgspec.msgpack.Encoder().encode
decode_base = msgspec.msgpack.Decoder(ArchivedBase).decode


class LedgerReadError(ValueError):
    """A stored row cannot be read (a damaged store): ``seq`` is the row its key names."""

    def __init__(self, seq: int, reason: str) -> None:
        super().__init__(f"seq {seq}: {reason}")
        self.seq = seq
        self.reason = reason


class LedgerView:
    """One consistent snapshot of the sign stage's tables (one LMDB read transaction).

    Every answer comes from the same moment, so a size, the entries, the tree and the
    checkpoints read through one view always agree with each other. A table the store does not
    have (a store that only ever held entries) reads as empty.
    """

    def __init__(self, txn: lmdb.Transaction, tables: dict[str, Any]) -> None:
        self._txn = txn
        self._tables = tables

    def size(self) -> int:
        """How many entries the ledger has (its next seq), archived ones included."""
        db = self._tables[LEDGER_TABLE]
        held = self._txn.stat(db)["entries"] if db is not None else 0
        return self.first_seq() + held

    def archived(self) -> ArchivedBase | None:
        """The newest archival (``mro-edge ledger archive``), or None if nothing was ever archived."""
        db = self._tables.get(ARCHIVED_TABLE)
        if db is None:
            return None
        cursor = self._txn.cursor(db=db)
        return decode_base(cursor.value()) if cursor.last() else None

    def first_seq(self) -> int:
        """The first seq the box still holds (0 unless entries were archived)."""
        base = self.archived()
        return base.n if base is not None else 0

    def head(self) -> SignedEntry | None:
        """The last entry (None for an empty ledger); LedgerReadError if it is unreadable."""
        db = self._tables[LEDGER_TABLE]
        if db is None:
            return None
        cursor = self._txn.cursor(db=db)
        return _decode(cursor.key(), cursor.value()) if cursor.last() else None

    def entries(self, from_seq: int = 0) -> Iterator[SignedEntry]:
        """The entries from ``from_seq`` on, in seq order, one at a time (memory stays flat)."""
        db = self._tables[LEDGER_TABLE]
        if db is None:
            return
        cursor = self._txn.cursor(db=db)
        if cursor.set_range(u64(from_seq)):
            for key, value in cursor:
                yield _decode(key, value)

    def tree(self) -> MerkleTree | None:
        """The stored Merkle tree, read-only (None if the store has no tree table)."""
        db = self._tables[MERKLE_TABLE]
        return lmdb_tree(self._txn, db, write=False) if db is not None else None

    def newest_checkpoint(self) -> tuple[int, bytes] | None:
        """(size, signed note) of the newest checkpoint the sign service stored, or None."""
        db = self._tables[CHECKPOINTS_TABLE]
        if db is None:
            return None
        cursor = self._txn.cursor(db=db)
        return (from_u64(cursor.key()), bytes(cursor.value())) if cursor.last() else None

    def checkpoint_at(self, size: int) -> bytes | None:
        """The stored checkpoint over exactly ``size`` entries, or None."""
        db = self._tables[CHECKPOINTS_TABLE]
        value = self._txn.get(u64(size), db=db) if db is not None else None
        return bytes(value) if value is not None else None

    def newest_checkpoint_size(self, at_most: int) -> int | None:
        """The size of the newest stored checkpoint covering at most ``at_most`` entries, or None."""
        db = self._tables[CHECKPOINTS_TABLE]
        if db is None:
            return None
        cursor = self._txn.cursor(db=db)
        found = cursor.prev() if cursor.set_range(u64(at_most + 1)) else cursor.last()
        return from_u64(cursor.key()) if found else None

    def checkpoint_at_most(self, size: int) -> bytes | None:
        """The newest stored checkpoint covering at most ``size`` entries (None if there is none).

        For the uplink after the gateway acknowledged up to seq H: ``checkpoint_at_most(H + 1)``
        is a checkpoint the gateway can check now (it holds every entry it covers).
        """
        db = self._tables[CHECKPOINTS_TABLE]
        if db is None:
            return None
        cursor = self._txn.cursor(db=db)
        found = cursor.prev() if cursor.set_range(u64(size + 1)) else cursor.last()
        return bytes(cursor.value()) if found else None


def _decode(key: bytes, value: bytes) -> SignedEntry:
    try:
        return decode_entry(value)
    except (ValueError, TypeError) as exc:
        seq = from_u64(key) if len(key) == 8 else -1
        raise LedgerReadError(seq, f"the stored row is unreadable (damaged store): {exc}") from None


def _table_or_none(store: Store, name: str) -> Any:
    try:
        return store.table(name)
    except KeyError:
        return None


@contextmanager
def ledger_view(store: Store) -> Iterator[LedgerView]:
    """A ``LedgerView`` of ``store`` (the sign service's own store, or a ``LedgerReader``)."""
    tables = {name: _table_or_none(store, name) for name in SIGN_TABLES}  # LMDB cannot open one inside a txn
    with store.read() as txn:
        yield LedgerView(txn, tables)


class LedgerReader(Store):
    """The sign stage's store opened read-only, for every other process (uplink, validate, the audit,
    the CLI): safe beside the running sign service (LMDB MVCC). The sign stage is its only writer.

    Each method reads one snapshot; ``snapshot()`` gives a ``LedgerView`` for several answers
    that must agree. A table the sign service has not created reads as empty.
    """

    def __init__(self, path: Path, *, map_size_mb: int = 4096) -> None:
        self.path = Path(path)
        if not (self.path / "data.mdb").exists():
            raise StoreError(f"no store at {self.path}: has the service run with this MRO_DATA_DIR?")
        self._gate = TxnGate()  # the sign service grows its map: Store.read adopts the new size
        self.max_bytes = map_size_mb * MIB
        try:
            self.env = lmdb.open(str(self.path), map_size=map_size_mb * MIB,
                                 max_dbs=len(SIGN_TABLES) + 8, readonly=True, max_readers=64)
        except lmdb.Error as exc:
            raise StoreError(f"cannot open store {self.path}: {exc}") from exc
        self._tables = {}
        for name in SIGN_TABLES:
            self._open(name)

    def _open(self, name: str) -> Any:
        try:
            self._tables[name] = self.env.open_db(name.encode(), create=False)
        except lmdb.NotFoundError:
            return None
        return self._tables[name]

    def table(self, name: str) -> Any:
        db = self._tables.get(name) or self._open(name)
        if db is None:
            raise KeyError(f"the sign store {self.path} has no table {name!r} (yet)")
        return db

    def has(self, name: str) -> bool:
        return _table_or_none(self, name) is not None

    def count(self, table: str) -> int:
        return super().count(table) if self.has(table) else 0

    def snapshot(self) -> AbstractContextManager[LedgerView]:
        return ledger_view(self)

    def size(self) -> int:
        with ledger_view(self) as view:
            return view.size()

    def archived(self) -> ArchivedBase | None:
        with ledger_view(self) as view:
            return view.archived()

    def head(self) -> SignedEntry | None:
        with ledger_view(self) as view:
            return view.head()

    def root(self) -> bytes | None:
        """The stored Merkle root over all entries (None if the store has no tree table)."""
        with ledger_view(self) as view:
            tree = view.tree()
            return tree.root() if tree is not None else None

    def entries(self, from_seq: int = 0) -> Iterator[SignedEntry]:
        return iter_entries(self, from_seq)

    def checkpoint_at_most(self, size: int) -> bytes | None:
        return checkpoint_at_most(self, size)

    def latest_checkpoint(self) -> bytes | None:
        return latest_checkpoint(self)

    def __enter__(self) -> LedgerReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()



def open_ledger(config: Config) -> LedgerReader:
    """The sign stage's store, read-only: safe beside the running sign service (LMDB MVCC)."""
    return LedgerReader(config.stage_dir(SIGN_STAGE))


def iter_entries(store: Store, from_seq: int = 0) -> Iterator[SignedEntry]:
    """The entries of ``store`` from ``from_seq`` on, streamed from one snapshot."""
    with ledger_view(store) as view:
        yield from view.entries(from_seq)


def latest_checkpoint(store: Store) -> bytes | None:
    """The newest signed checkpoint note the sign service stored (None before the first one)."""
    with ledger_view(store) as view:
        newest = view.newest_checkpoint()
    return newest[1] if newest is not None else None


def checkpoint_at_most(store: Store, size: int) -> bytes | None:
    """``LedgerView.checkpoint_at_most`` on a snapshot of ``store``."""
    with ledger_view(store) as view:
        return view.checkpoint_at_most(size)


def latest_checkpoint_path(config: Config) -> Path:
    return config.data_path / "keys" / LATEST_CHECKPOINT_FILE


def read_latest_checkpoint(path: Path) -> bytes | None:
    """``keys/checkpoint.latest`` (the newest checkpoint the sign service signed), or None."""
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        return None


def write_latest_checkpoint(path: Path, note: bytes) -> None:
    """Replace ``keys/checkpoint.latest`` atomically and durably."""
    write_atomic(path, note, mode=0o644)


PRUNE_BATCH = 2000  # rows deleted per write transaction: the sign service waits at most that long


class LedgerPruner:
    """The sign store opened for writing by ``mro-edge ledger archive`` (beside the running sign
    service: LMDB lets one write transaction at a time across processes, and each one here is
    short). It records an archival and deletes what the archive now holds; nothing else.
    """

    def __init__(self, config: Config) -> None:
        path = config.stage_dir(SIGN_STAGE)
        if not (path / "data.mdb").exists():
            raise StoreError(f"no ledger at {path}: has the sign service run with this MRO_DATA_DIR?")
        size_mb = (path / "data.mdb").stat().st_size // MIB + 64  # room for the copy-on-write of deletes
        self.store = Store(path, SIGN_TABLES, map_size_mb=size_mb, map_max_mb=config.stage.ledger_map_max_mb)

    def snapshot(self) -> AbstractContextManager[LedgerView]:
        return ledger_view(self.store)

    def record(self, base: ArchivedBase) -> None:
        """Store the archival: from now on the ledger starts at ``base.n``. Refused (ValueError) unless
        the ledger still holds entry ``base.n`` linking to ``base.prev`` and the tree's root at n is
        ``base.root`` (so nothing was archived that the box does not hold as archived)."""
        with self.store.write() as txn:
            view = LedgerView(txn, {name: self.store.table(name) for name in SIGN_TABLES})
            old = view.archived()
            if old is not None and old.n >= base.n:
                raise ValueError(f"the ledger already starts at seq {old.n}; nothing before seq {base.n} to archive")
            following = next(view.entries(base.n), None)
            if following is None or following.seq != base.n:
                raise ValueError(f"the ledger does not hold seq {base.n} (the first entry it would keep)")
            tree = view.tree()
            if tree is None or tree.root(base.n).hex() != base.root:
                raise ValueError(f"the ledger's Merkle root at {base.n} is not the archive's")
            if decode_entry_prev(following) != base.prev:
                raise ValueError(f"seq {base.n} does not link to the archive's last entry")
            txn.put(u64(base.n), encode_base(base), db=self.store.table(ARCHIVED_TABLE))

    def prune(self, batch: int = PRUNE_BATCH) -> tuple[int, int]:
        """Delete the entries and Merkle nodes the newest archival covers, ``batch`` rows per
        transaction; returns (entries, nodes) deleted. Idempotent: an interrupted run resumes."""
        from shared.ledger.frontier import prunable_keys

        with ledger_view(self.store) as view:
            base = view.archived()
        if base is None:
            return 0, 0
        ledger_db, merkle_db = self.store.table(LEDGER_TABLE), self.store.table(MERKLE_TABLE)

        def entries_below(txn: lmdb.Transaction) -> int:
            cursor = txn.cursor(db=ledger_db)
            done = 0
            while done < batch and cursor.first() and from_u64(cursor.key()) < base.n:
                cursor.delete()
                done += 1
            return done

        def nodes_below(txn: lmdb.Transaction) -> int:
            keys = prunable_keys(lambda start: _keys_from(txn, merkle_db, start), base.n, batch)
            for key in keys:
                txn.delete(key, db=merkle_db)
            return len(keys)

        return self._in_batches(entries_below, batch), self._in_batches(nodes_below, batch)

    def _in_batches(self, delete: Any, batch: int) -> int:
        """Run ``delete(txn)`` in its own write transaction until it deletes fewer than ``batch``
        rows; a transaction that grew the map (``MapGrown``) is simply run again."""
        total = 0
        while True:
            try:
                with self.store.write() as txn:
                    done = delete(txn)
            except MapGrown:
                continue
            total += done
            if done < batch:
                return total

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> LedgerPruner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _keys_from(txn: lmdb.Transaction, db: Any, start: bytes) -> Iterator[bytes]:
    cursor = txn.cursor(db=db)
    if cursor.set_range(start):
        for key in cursor.iternext(keys=True, values=False):
            yield bytes(key)


def decode_entry_prev(e: SignedEntry) -> str:
    """The ``prev`` an entry's bytes carry."""
    from shared.ledger.entry import parse_entry

    return parse_entry(e.entry).prev


def pending_archival(get: Any) -> ArchivedBase | None:
    """The newest archival if its ``ledger_archived`` entry is still to be appended (the sign
    service, inside its batch transaction: ``get`` is the unit of work's last-row reader)."""
    last = get(ARCHIVED_TABLE)
    if last is None:
        return None
    base = decode_base(last[1])
    return base if base.recorded_seq is None else None
