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

Read by the sign stage, `mro-edge ledger export`, the audit tools and the uplink; entries are
streamed with a cursor, never loaded all at once.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import lmdb
import msgspec

from shared.runtime.config import Config
from shared.runtime.files import write_atomic
from shared.ledger.entry import SignedEntry
from shared.ledger.merkle import MERKLE_TABLE
from shared.runtime.store import Store, StoreError, u64

LEDGER_TABLE = "ledger"
CHECKPOINTS_TABLE = "checkpoints"
SIGN_TABLES = (LEDGER_TABLE, MERKLE_TABLE, CHECKPOINTS_TABLE)
SIGN_STAGE = "sign"
LATEST_CHECKPOINT_FILE = "checkpoint.latest"

encode_entry = msgspec.msgpack.Encoder().encode
decode_entry = msgspec.msgpack.Decoder(SignedEntry).decode


class LedgerStore(Store):
    """The sign stage's store opened read-only (safe beside the running sign service: LMDB MVCC).

    Unlike a plain read-only ``Store`` it opens whichever sign tables exist, so it works on a store
    written before the ``merkle``/``checkpoints`` tables existed; ``table`` raises KeyError for a
    table the sign service has not created (yet).
    """

    def __init__(self, path: Path, *, map_size_mb: int = 4096) -> None:  # noqa: D107 - no Store.__init__
        self.path = Path(path)
        if not (self.path / "data.mdb").exists():
            raise StoreError(f"no store at {self.path}: has the service run with this MRO_DATA_DIR?")
        try:
            self.env = lmdb.open(str(self.path), map_size=map_size_mb * 1024 * 1024, max_dbs=len(SIGN_TABLES) + 8,
                                 readonly=True, max_readers=64)
        except lmdb.Error as exc:
            raise StoreError(f"cannot open store {self.path}: {exc}") from exc
        self._tables = {}
        for name in SIGN_TABLES:
            self._open(name)

    def _open(self, name: str):
        try:
            self._tables[name] = self.env.open_db(name.encode(), create=False)
        except lmdb.NotFoundError:
            return None
        return self._tables[name]

    def table(self, name: str):
        db = self._tables.get(name) or self._open(name)
        if db is None:
            raise KeyError(f"the sign store {self.path} has no table {name!r} (yet)")
        return db

    def has(self, name: str) -> bool:
        try:
            self.table(name)
        except KeyError:
            return False
        return True

    def count(self, table: str) -> int:
        return super().count(table) if self.has(table) else 0


def open_ledger(config: Config) -> LedgerStore:
    """The sign stage's store, read-only: safe beside the running sign service (LMDB MVCC)."""
    return LedgerStore(config.stage_dir(SIGN_STAGE))


def iter_entries(store: Store, from_seq: int = 0) -> Iterator[SignedEntry]:
    table = store.table(LEDGER_TABLE)  # before the read transaction: LMDB cannot open a table inside one
    with store.read() as txn:
        cursor = txn.cursor(db=table)
        if cursor.set_range(u64(from_seq)):
            for _, value in cursor:
                yield decode_entry(value)


def latest_checkpoint(store: Store) -> bytes | None:
    """The newest signed checkpoint note the sign service stored (None before the first one).

    For the uplink: ``latest_checkpoint(open_ledger(config))``, then POST it to the gateway's
    ``/v1/checkpoints`` once the gateway holds ``size`` entries.
    """
    try:
        db = store.table(CHECKPOINTS_TABLE)
    except KeyError:
        return None
    with store.read() as txn:
        cursor = txn.cursor(db=db)
        return bytes(cursor.value()) if cursor.last() else None


def checkpoint_at_most(store: Store, size: int) -> bytes | None:
    """The newest stored checkpoint covering at most ``size`` entries (None if there is none).

    For the uplink after the gateway acknowledged up to seq H: ``checkpoint_at_most(store, H + 1)``
    is a checkpoint the gateway can check now (it holds every entry it covers).
    """
    try:
        db = store.table(CHECKPOINTS_TABLE)
    except KeyError:
        return None
    with store.read() as txn:
        cursor = txn.cursor(db=db)
        if cursor.set_range(u64(size + 1)):
            found = cursor.prev()
        else:
            found = cursor.last()
        return bytes(cursor.value()) if found else None


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
