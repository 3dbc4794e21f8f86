"""RFC 9162 proofs as an auditor uses them: for random sizes m <= n, the tree's proofs verify against
roots computed straight from the leaves (RFC 6962 section 2.1, recursively), and every tampered
proof, root, index or size is refused. The public vectors are in test_merkle.py."""

from __future__ import annotations

import hashlib

from hypothesis import given, settings
from hypothesis import strategies as st

from shared.ledger.merkle import MerkleTree, leaf_hash, verify_consistency, verify_inclusion


def mth(leaves: list[bytes]) -> bytes:
    """MTH(D[n]) over leaf hashes, by the recursive definition (independent of the stored tree)."""
    if not leaves:
        return hashlib.sha256(b"").digest()
    if len(leaves) == 1:
        return leaves[0]
    k = 1 << ((len(leaves) - 1).bit_length() - 1)
    return hashlib.sha256(b"\x01" + mth(leaves[:k]) + mth(leaves[k:])).digest()


def built(n: int) -> tuple[MerkleTree, list[bytes]]:
    nodes: dict[bytes, bytes] = {}
    tree = MerkleTree(nodes.get, nodes.__setitem__)
    leaves = [leaf_hash(f"entry {i} of {n}".encode()) for i in range(n)]
    tree.extend(leaves)
    return tree, leaves


def flip(proof: list[bytes], at: int, bit: int) -> list[bytes]:
    out = list(proof)
    raw = bytearray(out[at])
    raw[bit // 8] ^= 1 << (bit % 8)
    out[at] = bytes(raw)
    return out


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_consistency_proofs_verify_and_tampering_fails(data):
    n = data.draw(st.integers(1, 300), label="n")
    m = data.draw(st.integers(1, n), label="m")
    tree, leaves = built(n)
    old_root, new_root = mth(leaves[:m]), mth(leaves[:n])
    proof = tree.consistency_proof(m, n)
    assert verify_consistency(m, n, old_root, new_root, proof)

    other = mth(leaves[: m - 1]) if m > 1 else hashlib.sha256(b"x").digest()
    assert not verify_consistency(m, n, other, new_root, proof)
    assert not verify_consistency(m, n, old_root, hashlib.sha256(new_root).digest(), proof)
    assert not verify_consistency(m, n, old_root, new_root, proof + [old_root])
    if proof:
        at = data.draw(st.integers(0, len(proof) - 1), label="at")
        bit = data.draw(st.integers(0, 255), label="bit")
        assert not verify_consistency(m, n, old_root, new_root, flip(proof, at, bit))
        assert not verify_consistency(m, n, old_root, new_root, proof[:-1])
        assert not verify_consistency(m, n, old_root, new_root, proof[1:])
        assert not verify_consistency(m, n, new_root, old_root, proof)  # swapped roots


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_inclusion_proofs_verify_and_tampering_fails(data):
    n = data.draw(st.integers(1, 300), label="n")
    size = data.draw(st.integers(1, n), label="size")
    index = data.draw(st.integers(0, size - 1), label="index")
    tree, leaves = built(n)
    root = mth(leaves[:size])
    proof = tree.inclusion_proof(index, size)
    assert verify_inclusion(leaves[index], index, size, proof, root)

    assert not verify_inclusion(leaf_hash(b"another record"), index, size, proof, root)
    assert not verify_inclusion(leaves[index], index, size, proof, hashlib.sha256(root).digest())
    assert not verify_inclusion(leaves[index], index, size, proof + [root], root)
    if size > 1:
        assert not verify_inclusion(leaves[index], index ^ 1 if (index ^ 1) < size else index - 1, size, proof, root)
    if proof:
        at = data.draw(st.integers(0, len(proof) - 1), label="at")
        bit = data.draw(st.integers(0, 255), label="bit")
        assert not verify_inclusion(leaves[index], index, size, flip(proof, at, bit), root)
        assert not verify_inclusion(leaves[index], index, size, proof[:-1], root)
