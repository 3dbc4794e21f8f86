"""Where the signed ledger lives: table `ledger` of the sign stage's LMDB, seq -> SignedEntry.

Read by the sign stage (chain head), `mro-edge ledger export` and the audit tools; entries are
streamed with a cursor, never loaded all at once.
"""

from __future__ import annotations

from collections.abc import Iterator

import msgspec

from shared.config import Config
from shared.ledger import SignedEntry
from shared.store import Store, u64

LEDGER_TABLE = "ledger"
SIGN_STAGE = "sign"

encode_entry = msgspec.msgpack.Encoder().encode
decode_entry = msgspec.msgpack.Decoder(SignedEntry).decode


def open_ledger(config: Config) -> Store:
    """The sign stage's store, read-only: safe beside the running sign service (LMDB MVCC)."""
    return Store(config.stage_dir(SIGN_STAGE), (LEDGER_TABLE,), readonly=True)


def iter_entries(store: Store, from_seq: int = 0) -> Iterator[SignedEntry]:
    with store.read() as txn:
        cursor = txn.cursor(db=store.table(LEDGER_TABLE))
        if cursor.set_range(u64(from_seq)):
            for _, value in cursor:
                yield decode_entry(value)
