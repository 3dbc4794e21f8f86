"""Where the signed ledger lives: the sign stage's LMDB, and the last checkpoint kept beside the keys.

Tables of ``$MRO_DATA_DIR/sign`` (one environment, one writer: the sign service):

- ``ledger``       u64(seq) -> SignedEntry (msgpack): the entries, in seq order;
- ``merkle``       the RFC 6962 tree over the entries (``shared.ledger.merkle``), written in the same
                   transaction as each append;
- ``checkpoints``  u64(size) -> signed C2SP checkpoint note (bytes), written after the commit
                   of the entries it covers.

``$MRO_DATA_DIR/keys/checkpoint.latest`` repeats the newest signed checkpoint outside the LMDB
file, so that restoring an old copy of the store (a backup, an SD-card image, a VM snapshot)
does not also restore an old checkpoint: the sign service compares the two on start.

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
from shared.runtime.store import MIB, Store, StoreError, TxnGate, from_u64, u64

LEDGER_TABLE = "ledger"
CHECKPOINTS_TABLE = "checkpoints"
SIGN_TABLES = (LEDGER_TABLE, MERKLE_TABLE, CHECKPOINTS_TABLE)
SIGN_STAGE = "sign"
LATEST_CHECKPOINT_FILE = "checkpoint.latest"

encode_entry = msgspec.msgpack.Encoder().encode
decode_entry = msgspec.msgpack.Decoder(SignedEntry).decode


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
        """How many entries the ledger holds."""
        db = self._tables[LEDGER_TABLE]
        return self._txn.stat(db)["entries"] if db is not None else 0

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
