"""Each origin's RFC 6962 Merkle tree in the gateway's database (table ``merkle_nodes``).

The same node layout as the edge (``shared.ledger.merkle``): the hash of every complete subtree,
level 0 being the leaf hashes, so the root at any size and any proof is O(log n) node reads.
New entries are added in the transaction that stores them: ``OriginTree.extend`` computes the
new nodes in memory (reading the O(log n) frontier nodes it needs) and ``flush`` writes them
in one bulk insert (``COPY`` on PostgreSQL). A database that holds entries from before the
tree existed gets its tree built once, from the stored entries, the next time it is needed.
"""

from __future__ import annotations

import struct

from services.gateway.storage import Tx
from shared.ledger.merkle import SIZE_KEY, MerkleTree, leaf_hash

_KEY = struct.Struct(">cBQ")
_U64 = struct.Struct(">Q")
_BACKFILL_CHUNK = 5000


class OriginTree:
    """A ``MerkleTree`` over ``origin``'s entries, reading from and buffering writes for one ``Tx``."""

    def __init__(self, tx: Tx, origin: str) -> None:
        self.tx = tx
        self.origin = origin
        self._size = tx.merkle_size(origin)
        self._stored_size = self._size
        self._new: dict[bytes, bytes] = {}
        self.tree = MerkleTree(self._get, self._put)

    def _get(self, key: bytes) -> bytes | None:
        if key == SIZE_KEY:
            return _U64.pack(self._size)
        value = self._new.get(key)
        if value is not None:
            return value
        _, level, idx = _KEY.unpack(key)
        return self.tx.merkle_node(self.origin, level, idx)

    def _put(self, key: bytes, value: bytes) -> None:
        if key == SIZE_KEY:
            self._size = _U64.unpack(value)[0]
        else:
            self._new[key] = value

    @property
    def size(self) -> int:
        return self._size

    def catch_up(self, held: int) -> int:
        """Build the tree over stored entries it does not cover yet (``held`` = entries stored)."""
        added = 0
        while self._size < held:
            rows = self.tx.entries(self.origin, self._size, min(_BACKFILL_CHUNK, held - self._size))
            if not rows or rows[0]["seq"] != self._size:
                raise RuntimeError(f"origin {self.origin}: entry {self._size} is missing from the database")
            self.tree.extend([leaf_hash(r["entry"]) for r in rows])
            added += len(rows)
        return added

    def extend(self, entries: list[bytes], first_seq: int) -> None:
        """Append the leaves of ``entries`` (exact bytes) that start at seq ``first_seq``."""
        self.catch_up(first_seq)
        if self._size != first_seq:
            raise RuntimeError(f"origin {self.origin}: the tree covers {self._size} entries, not {first_seq}")
        self.tree.extend([leaf_hash(e) for e in entries])

    def flush(self) -> None:
        """Write the new nodes and the size (same transaction as the entries)."""
        if self._new:
            nodes = []
            for key, value in self._new.items():
                _, level, idx = _KEY.unpack(key)
                nodes.append((level, idx, value))
            self.tx.insert_merkle_nodes(self.origin, nodes)
            self._new.clear()
        if self._size != self._stored_size:
            self.tx.set_merkle_size(self.origin, self._size)
            self._stored_size = self._size
