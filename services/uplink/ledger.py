"""The uplink's read-only view of the signed ledger, through its owner shared.ledger.store.

The sign stage's store may not exist yet, or not have its `ledger` table yet (the uplink
started first): the local head is then -1, the empty ledger, until it has.
"""

from __future__ import annotations

from collections.abc import Iterator

from services.uplink.client import Head
from shared.ledger.entry import GENESIS_PREV, export_row, parse_entry
from shared.ledger.store import LedgerReader, open_ledger
from shared.runtime.config import Config
from shared.runtime.messages import json_encode
from shared.runtime.store import StoreError


class LedgerView:
    """The sign stage's ledger, opened when first found (LMDB MVCC: safe beside the sign service)."""

    def __init__(self, config: Config):
        self.config = config
        self._store: LedgerReader | None = None

    def _open(self) -> LedgerReader | None:
        if self._store is None:
            try:
                self._store = open_ledger(self.config)
            except StoreError:
                return None  # no sign store yet
        return self._store

    def head(self) -> Head:
        """The chain head: what the gateway must hold for us to be in sync."""
        reader = self._open()
        entry = reader.head() if reader is not None else None
        return Head(entry.seq, entry.hash) if entry is not None else Head(-1, GENESIS_PREV)

    def export_rows(self, first: int, last: int) -> Iterator[tuple[int, bytes]]:
        """(seq, export row as the gateway takes it) for seq `first` .. `last`, as far as held."""
        reader = self._open()
        if reader is None:
            return
        for entry in reader.entries(first):
            if entry.seq > last:
                break
            yield entry.seq, json_encode(export_row(entry))

    def recorded_at(self, seq: int) -> str | None:
        """When the entry of `seq` was recorded (RFC 3339 UTC), None if the ledger has no such entry."""
        reader = self._open()
        if reader is None:
            return None
        for entry in reader.entries(seq):
            return parse_entry(entry.entry).recorded_at if entry.seq == seq else None
        return None

    def checkpoint_at_most(self, size: int) -> bytes | None:
        """The newest signed checkpoint covering at most `size` entries, if any."""
        reader = self._open()
        return reader.checkpoint_at_most(size) if reader is not None else None

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None
