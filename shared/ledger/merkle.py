"""RFC 6962 / RFC 9162 Merkle tree over ledger entries (DESIGN.md section 6).

Hashes (RFC 9162 section 2.1.1)::

    leaf_hash(E)   = SHA-256(0x00 || E)          E = the exact entry bytes
    node_hash(l,r) = SHA-256(0x01 || l || r)
    EMPTY_ROOT     = SHA-256("")                 root of the empty tree

``MerkleTree`` keeps the tree incrementally in a key-value table (the sign stage's LMDB, in the
same write transaction as the ledger append; never a full rebuild). It stores the hash of every
*complete* subtree: node (level L, index i) covers leaves ``[i * 2^L, (i + 1) * 2^L)``, level 0
being the leaf hashes. Appending leaf n writes (0, n) and then, while the index is odd, combines
it with its stored left sibling into the parent: on average two node writes and one read per
append. Complete subtrees never change once written, so the root at any past size and every
inclusion or consistency proof is a right-to-left fold of O(log n) stored nodes.

Storage layout (one dedicated LMDB table, ``MERKLE_TABLE``)::

    b"m" + level (1 byte) + index (8 bytes, big-endian)  ->  32-byte node hash   (10-byte keys)
    b"msize"                                             ->  tree size, 8 bytes big-endian

The two forms cannot collide: node keys are 10 bytes and their level byte is at most 63,
whereas ``b"msize"`` is 5 bytes (its second byte ``s`` would be level 115).

``verify_inclusion`` and ``verify_consistency`` are the RFC 9162 section 2.1.3.2 / 2.1.4.2
algorithms, written out step by step; ``Frontier`` is the O(log n)-memory compact range an
auditor uses to recompute a root while streaming entries.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Iterable, Sequence
from functools import partial

__all__ = [
    "EMPTY_ROOT",
    "HASH_SIZE",
    "MERKLE_TABLE",
    "SIZE_KEY",
    "Frontier",
    "MerkleCorruptError",
    "MerkleTree",
    "leaf_hash",
    "lmdb_tree",
    "node_hash",
    "node_key",
    "verify_consistency",
    "verify_inclusion",
]

HASH_SIZE = 32
MERKLE_TABLE = "merkle"
SIZE_KEY = b"msize"
EMPTY_ROOT = hashlib.sha256(b"").digest()
_MAX_SIZE = 2**63  # sizes and indexes fit a u64 key with room to spare

_U64 = struct.Struct(">Q")
_KEY = struct.Struct(">cBQ")
_sha256 = hashlib.sha256


def leaf_hash(entry: bytes) -> bytes:
    """RFC 6962 leaf hash of the exact entry bytes: SHA-256(0x00 || entry)."""
    return _sha256(b"\x00" + entry).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """RFC 6962 interior node hash: SHA-256(0x01 || left || right)."""
    return _sha256(b"\x01" + left + right).digest()


def node_key(level: int, index: int) -> bytes:
    """Key of the complete subtree at ``level`` (0 = leaves) and ``index``: b"m" + level + u64 BE."""
    return _KEY.pack(b"m", level, index)


class MerkleCorruptError(Exception):
    """A stored node or the stored size is missing or malformed: the tree table is damaged.

    History is never repaired silently; the message names the node and the affected leaves.
    """


def _largest_pow2_below(n: int) -> int:
    """The largest power of two strictly smaller than ``n`` (n >= 2): RFC 9162's ``k``."""
    return 1 << ((n - 1).bit_length() - 1)


class MerkleTree:
    """An append-only RFC 6962 tree stored through ``get``/``put`` callables.

    ``get(key) -> bytes | None`` and ``put(key, value)`` are usually bound to one LMDB write
    transaction (see ``lmdb_tree``), so the tree commits or aborts with the ledger entry it
    covers. The object holds no state of its own: it is cheap to build per transaction and
    never caches anything a rolled-back transaction could leave stale.
    """

    __slots__ = ("_get", "_put")

    def __init__(self, get: Callable[[bytes], bytes | None], put: Callable[[bytes, bytes], object]) -> None:
        self._get = get
        self._put = put

    # -- reading --------------------------------------------------------------------------
    def size(self) -> int:
        """Number of leaves appended so far (0 for a new table)."""
        raw = self._get(SIZE_KEY)
        if raw is None:
            return 0
        if len(raw) != 8:
            raise MerkleCorruptError(f"the stored tree size is {len(raw)} bytes, not 8")
        return _U64.unpack(raw)[0]

    def node(self, level: int, index: int) -> bytes:
        """The stored hash of complete subtree (level, index); MerkleCorruptError if absent or malformed."""
        value = self._get(_KEY.pack(b"m", level, index))
        if value is None or len(value) != HASH_SIZE:
            first = index << level
            what = "missing" if value is None else f"{len(value)} bytes long"
            raise MerkleCorruptError(
                f"Merkle node (level {level}, index {index}) covering leaves {first}..{first + (1 << level) - 1} "
                f"is {what}: the tree table is damaged"
            )
        return bytes(value)

    def leaf(self, index: int) -> bytes:
        """The stored leaf hash of leaf ``index`` (< size())."""
        self._check_size(index + 1, self.size())
        return self.node(0, index)

    def _range(self, start: int, end: int) -> bytes:
        """MTH(D[start:end]) for a range whose start is aligned to a power of two >= end - start.

        Such a range is a run of complete stored subtrees, largest first (the binary digits of
        its length), folded from the right: exactly the RFC 6962 recursion. Every range the
        proof recursions below ask for has this shape.
        """
        n = end - start
        if n <= 0:
            raise ValueError("empty range")
        parts: list[bytes] = []
        pos = start
        for level in range(n.bit_length() - 1, -1, -1):
            if n >> level & 1:
                parts.append(self.node(level, pos >> level))
                pos += 1 << level
        h = parts[-1]
        for left in reversed(parts[:-1]):
            h = node_hash(left, h)
        return h

    @staticmethod
    def _check_size(size: int, current: int) -> None:
        if not 0 <= size <= current:
            raise ValueError(f"tree size {size} is outside 0..{current} (the current size)")

    def root(self, size: int | None = None) -> bytes:
        """Root hash at ``size`` leaves (default: now); any past size, O(log n) reads."""
        current = self.size()
        size = current if size is None else size
        self._check_size(size, current)
        return EMPTY_ROOT if size == 0 else self._range(0, size)

    def inclusion_proof(self, index: int, size: int | None = None) -> list[bytes]:
        """RFC 9162 section 2.1.3.1 PATH(index, D[0:size]), leaf-side sibling first."""
        current = self.size()
        size = current if size is None else size
        self._check_size(size, current)
        if not 0 <= index < size:
            raise ValueError(f"leaf index {index} is outside a tree of size {size}")
        path: list[bytes] = []
        lo, hi = 0, size
        while hi - lo > 1:
            k = _largest_pow2_below(hi - lo)
            if index < lo + k:
                path.append(self._range(lo + k, hi))
                hi = lo + k
            else:
                path.append(self._range(lo, lo + k))
                lo += k
        path.reverse()
        return path

    def consistency_proof(self, old_size: int, new_size: int | None = None) -> list[bytes]:
        """RFC 9162 section 2.1.4.1 PROOF(old_size, D[0:new_size]); requires 0 < old_size <= new_size.

        The proof for old_size == new_size is empty. From the empty tree there is no proof to give
        (every tree extends it), so old_size 0 is a ValueError, as RFC 9162 defines proofs for 0 < m.
        """
        current = self.size()
        new_size = current if new_size is None else new_size
        self._check_size(new_size, current)
        if not 0 < old_size <= new_size:
            raise ValueError(f"a consistency proof needs 0 < old size <= new size, got {old_size}, {new_size}")
        path: list[bytes] = []
        lo, hi = 0, new_size
        complete = True  # SUBPROOF's flag b: the old tree is a complete subtree seen so far
        while old_size != hi:
            k = _largest_pow2_below(hi - lo)
            if old_size - lo <= k:
                path.append(self._range(lo + k, hi))
                hi = lo + k
            else:
                path.append(self._range(lo, lo + k))
                lo += k
                complete = False
        if not complete:
            path.append(self._range(lo, hi))
        path.reverse()
        return path

    # -- writing --------------------------------------------------------------------------
    def append(self, leaf: bytes) -> int:
        """Append one leaf hash (``leaf_hash(entry)``); returns the new size."""
        return self.extend((leaf,))

    def extend(self, leaves: Iterable[bytes]) -> int:
        """Append several leaf hashes with one size read and one size write; returns the new size."""
        leaves = leaves if isinstance(leaves, tuple | list) else list(leaves)
        for leaf in leaves:  # validate everything before the first write
            if len(leaf) != HASH_SIZE:
                raise ValueError(f"a leaf hash is {HASH_SIZE} bytes (leaf_hash(entry)), got {len(leaf)}")
        get, put, pack = self._get, self._put, _KEY.pack
        n = start = self.size()
        if n + len(leaves) > _MAX_SIZE:
            raise ValueError("the tree is full")
        for leaf in leaves:
            put(pack(b"m", 0, n), leaf)
            h, i, level = leaf, n, 0
            while i & 1:
                left = get(pack(b"m", level, i - 1))
                if left is None or len(left) != HASH_SIZE:
                    left = self.node(level, i - 1)  # raises with the details
                h = _sha256(b"\x01" + left + h).digest()
                i >>= 1
                level += 1
                put(pack(b"m", level, i), h)
            n += 1
        if n != start:
            put(SIZE_KEY, _U64.pack(n))
        return n


def _no_put(key: bytes, value: bytes) -> None:
    raise TypeError("this Merkle tree is read-only")


def lmdb_tree(txn, db=None, *, write: bool = True) -> MerkleTree:
    """A MerkleTree bound to an ``lmdb.Transaction`` and table handle (``store.table(MERKLE_TABLE)``)."""
    get = partial(txn.get, db=db)
    return MerkleTree(get, partial(txn.put, db=db) if write else _no_put)


class Frontier:
    """Compact range over leaves 0..size-1: one hash per set bit of size, O(log n) memory.

    Enough to recompute the root while streaming millions of entries (``mro-edge audit verify``).
    """

    __slots__ = ("_stack", "size")

    def __init__(self) -> None:
        self.size = 0
        self._stack: list[bytes] = []  # complete subtrees, largest (leftmost) first

    def append(self, leaf: bytes) -> None:
        h, n, stack = leaf, self.size, self._stack
        while n & 1:
            h = _sha256(b"\x01" + stack.pop() + h).digest()
            n >>= 1
        stack.append(h)
        self.size += 1

    def root(self) -> bytes:
        if not self._stack:
            return EMPTY_ROOT
        h = self._stack[-1]
        for left in reversed(self._stack[:-1]):
            h = node_hash(left, h)
        return h


def _proof_ok(proof: Sequence[bytes]) -> bool:
    return all(isinstance(p, bytes | bytearray) and len(p) == HASH_SIZE for p in proof)


def verify_inclusion(leaf: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes) -> bool:
    """RFC 9162 section 2.1.3.2: True iff ``proof`` shows leaf hash ``leaf`` at ``index`` under ``root``.

    Beyond the RFC steps it insists on 32-byte hashes, so an empty or truncated leaf/root/proof
    element never verifies by accident.
    """
    if len(leaf) != HASH_SIZE or len(root) != HASH_SIZE or not _proof_ok(proof):
        return False
    # 1. leaf_index must be inside the tree.
    if not 0 <= index < size:
        return False
    # 2. fn = leaf_index, sn = tree_size - 1.  3. r = hash.
    fn, sn, r = index, size - 1, bytes(leaf)
    # 4. For each p in the inclusion path:
    for p in proof:
        # a. a path longer than the tree is deep fails.
        if sn == 0:
            return False
        # b. p is a left sibling when fn is a right child or the last node of its level.
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            # ii. if LSB(fn) is not set, shift both until it is set or fn is 0.
            while fn and not fn & 1:
                fn >>= 1
                sn >>= 1
        else:
            r = node_hash(r, p)
        # c.
        fn >>= 1
        sn >>= 1
    # 5. the path must reach the root exactly.
    return sn == 0 and r == root


def verify_consistency(old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]) -> bool:
    """RFC 9162 section 2.1.4.2: True iff ``proof`` shows the tree (old_size, old_root) is a prefix of
    (new_size, new_root).

    Equal sizes need an empty proof and equal roots. old_size 0 is refused: RFC 9162 defines
    consistency proofs for 0 < first, and "consistent with the empty tree" proves nothing.
    """
    if not 0 < old_size <= new_size:
        return False
    if old_size == new_size:
        return len(proof) == 0 and old_root == new_root
    if len(old_root) != HASH_SIZE or len(new_root) != HASH_SIZE or not _proof_ok(proof):
        return False
    # 1. An empty path fails.
    if not proof:
        return False
    path = list(proof)
    # 2. If first is an exact power of 2, prepend first_hash.
    if old_size & (old_size - 1) == 0:
        path.insert(0, bytes(old_root))
    # 3. fn = first - 1, sn = second - 1.
    fn, sn = old_size - 1, new_size - 1
    # 4. If LSB(fn) is set, right-shift fn and sn equally until it is not.
    while fn & 1:
        fn >>= 1
        sn >>= 1
    # 5. fr = sr = first value of the path.
    fr = sr = path[0]
    # 6. For each subsequent value c:
    for c in path[1:]:
        # a.
        if sn == 0:
            return False
        # b.
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            # ii. if LSB(fn) is not set, shift both until it is set or fn is 0.
            while fn and not fn & 1:
                fn >>= 1
                sn >>= 1
        else:
            sr = node_hash(sr, c)
        # c.
        fn >>= 1
        sn >>= 1
    # 7.
    return fr == old_root and sr == new_root and sn == 0
