"""A tree pruned to its compact range at n (``shared.ledger.frontier``) answers every root,
inclusion proof of a kept leaf and consistency proof between sizes >= n exactly as the whole
tree does, and goes on appending to the same roots."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.ledger.frontier import (
    compact_range,
    frontier_hashes,
    frontier_root,
    is_prunable,
    prunable_keys,
    resume_frontier,
)
from shared.ledger.merkle import Frontier, MerkleTree, leaf_hash, node_key


def leaves(count: int, start: int = 0) -> list[bytes]:
    return [leaf_hash(hashlib.sha256(str(i).encode()).digest()) for i in range(start, start + count)]


def dict_tree(size: int) -> tuple[dict[bytes, bytes], MerkleTree]:
    table: dict[bytes, bytes] = {}
    tree = MerkleTree(table.get, table.__setitem__)
    tree.extend(leaves(size))
    return table, tree


def prune(table: dict[bytes, bytes], n: int, batch: int = 7) -> int:
    """Delete as ``LedgerPruner.prune`` does: batches of prunable keys from an ordered scan."""
    def keys_from(start: bytes) -> Iterator[bytes]:
        return iter(sorted(k for k in table if k >= start))

    deleted = 0
    while True:
        keys = prunable_keys(keys_from, n, batch)
        for key in keys:
            del table[key]
        deleted += len(keys)
        if len(keys) < batch:
            return deleted


def archived_nodes(table: dict[bytes, bytes], n: int) -> set[bytes]:
    """The stored nodes that lie entirely inside [0, n)."""
    return {k for k in table if len(k) == 10 and (int.from_bytes(k[2:], "big") + 1) << k[1] <= n}


def check_equal(full: MerkleTree, pruned: MerkleTree, n: int, size: int) -> None:
    for s in range(max(n, 1), size + 1):
        assert pruned.root(s) == full.root(s), s
        for i in range(n, s):
            assert pruned.inclusion_proof(i, s) == full.inclusion_proof(i, s), (i, s)
        for old in range(max(n, 1), s + 1):
            assert pruned.consistency_proof(old, s) == full.consistency_proof(old, s), (old, s)


def test_compact_range_is_one_node_per_set_bit_and_gives_the_root():
    for n in range(1, 70):
        table, tree = dict_tree(n)
        nodes = compact_range(n)
        assert len(nodes) == bin(n).count("1")
        assert sum(1 << level for level, _ in nodes) == n
        assert frontier_root(tree.node(level, index) for level, index in nodes) == tree.root()
        assert not any(is_prunable(level, index, n) for level, index in nodes)


@pytest.mark.parametrize("size", [1, 2, 3, 5, 8, 13, 16, 33])
def test_every_cut_of_small_trees(size):
    full_table, full = dict_tree(size)
    for n in range(0, size + 1):
        table = dict(full_table)
        deleted = prune(table, n)
        pruned = MerkleTree(table.get, table.__setitem__)
        assert pruned.size() == size
        assert len(full_table) - len(table) == deleted <= 2 * n
        assert archived_nodes(table, n) == {node_key(level, index) for level, index in compact_range(n)}
        check_equal(full, pruned, n, size)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 300), st.data())
def test_pruned_tree_equals_the_whole_tree_at_later_sizes_and_appends_on(size, data):
    n = data.draw(st.integers(0, size), label="n")
    full_table, full = dict_tree(size)
    table = dict(full_table)
    prune(table, n)
    pruned = MerkleTree(table.get, table.__setitem__)
    probe = sorted({size, n or 1, data.draw(st.integers(max(n, 1), size), label="s")})
    for s in probe:
        assert pruned.root(s) == full.root(s)
        i = data.draw(st.integers(n, s - 1), label="i") if s > n else None
        if i is not None:
            assert pruned.inclusion_proof(i, s) == full.inclusion_proof(i, s)
        old = data.draw(st.integers(max(n, 1), s), label="old")
        assert pruned.consistency_proof(old, s) == full.consistency_proof(old, s)
    more = leaves(data.draw(st.integers(1, 40), label="more"), start=size)
    full.extend(more)
    pruned.extend(more)
    assert pruned.root() == full.root()
    assert pruned.consistency_proof(max(n, 1)) == full.consistency_proof(max(n, 1))
    assert archived_nodes(table, n) == {node_key(level, index) for level, index in compact_range(n)}


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 500), st.integers(0, 200))
def test_resumed_frontier_continues_like_one_that_saw_every_leaf(n, more):
    whole = Frontier()
    for leaf in leaves(n):
        whole.append(leaf)
    resumed = resume_frontier(n, frontier_hashes(whole))
    assert resumed.root() == whole.root() == frontier_root(frontier_hashes(whole))
    for leaf in leaves(more, start=n):
        whole.append(leaf)
        resumed.append(leaf)
    assert resumed.root() == whole.root() and resumed.size == whole.size


def test_resume_refuses_a_compact_range_of_the_wrong_shape():
    with pytest.raises(ValueError):
        resume_frontier(5, [bytes(32)])
    with pytest.raises(ValueError):
        resume_frontier(1, [bytes(31)])
