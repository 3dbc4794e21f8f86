"""The Merkle tree of a ledger whose first n entries were archived: which nodes it must keep.

After ``mro-edge ledger archive`` the box holds the entries from seq n on. Of the stored tree
(``shared.ledger.merkle``: one hash per complete subtree) it keeps, for [0, n), only the
*compact range* at n: the largest complete subtrees that fit in [0, n), one per set bit of n
(node (L, (n >> L) - 1) for each bit L of n). Every root, inclusion proof of a kept leaf and
consistency proof between sizes >= n is a fold of complete subtrees that either contain a kept
leaf or are maximal inside [0, n), so the kept nodes answer all of them exactly as the whole
tree would (``tests/unit/test_frontier.py`` checks this for every size up to a bound and with
hypothesis). Nodes entirely inside [0, n) below the compact range are never asked for again.

Pure functions; the LMDB deletes are ``shared.ledger.store.LedgerPruner``.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable

from shared.ledger.merkle import EMPTY_ROOT, HASH_SIZE, Frontier, node_hash, node_key

__all__ = ["compact_range", "frontier_hashes", "frontier_root", "is_prunable", "prunable_keys", "resume_frontier"]

_KEY = struct.Struct(">cBQ")


def compact_range(n: int) -> list[tuple[int, int]]:
    """(level, index) of the complete subtrees that make up [0, n), largest (leftmost) first."""
    return [(level, (n >> level) - 1) for level in range(n.bit_length() - 1, -1, -1) if n >> level & 1]


def is_prunable(level: int, index: int, n: int) -> bool:
    """True for a node entirely inside [0, n) that is not part of the compact range at n."""
    inside = (index + 1) << level <= n
    return inside and not (n >> level & 1 and index == (n >> level) - 1)


def prunable_keys(keys_from: Callable[[bytes], Iterable[bytes]], n: int, limit: int) -> list[bytes]:
    """Up to ``limit`` stored node keys that ``is_prunable`` at n, level by level.

    ``keys_from(start)`` yields the stored keys from ``start`` on, in order (an LMDB cursor)."""
    found: list[bytes] = []
    for level in range(n.bit_length()):
        cutoff = n >> level
        for key in keys_from(node_key(level, 0)):
            if len(key) != _KEY.size:
                break
            _, key_level, index = _KEY.unpack(key)
            if key_level != level or index >= cutoff:
                break
            if is_prunable(level, index, n):
                found.append(key)
                if len(found) >= limit:
                    return found
    return found


def resume_frontier(n: int, hashes: Iterable[bytes]) -> Frontier:
    """A ``Frontier`` standing at size n with the compact range ``hashes`` (largest first): the
    same as one that appended the n leaves, for an auditor verifying the entries from n on."""
    stack = [bytes(h) for h in hashes]
    if len(stack) != bin(n).count("1") or any(len(h) != HASH_SIZE for h in stack):
        raise ValueError(f"a compact range at size {n} is {bin(n).count('1')} hashes of {HASH_SIZE} bytes")
    frontier = Frontier()
    frontier.size = n
    frontier._stack = stack
    return frontier


def frontier_hashes(frontier: Frontier) -> list[bytes]:
    """The compact range a ``Frontier`` holds (largest subtree first)."""
    return list(frontier._stack)


def frontier_root(hashes: Iterable[bytes]) -> bytes:
    """The Merkle root of a compact range (``Frontier.root`` of the size it stands at)."""
    stack = list(hashes)
    if not stack:
        return EMPTY_ROOT
    h = stack[-1]
    for left in reversed(stack[:-1]):
        h = node_hash(left, h)
    return h
