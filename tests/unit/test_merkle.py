"""RFC 6962 / 9162 Merkle tree: public vectors, an independent reference, and the LMDB-backed tree."""

from __future__ import annotations

import base64
import hashlib
import json
from functools import cache
from pathlib import Path

import lmdb
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.ledger.merkle import (
    EMPTY_ROOT,
    MERKLE_TABLE,
    SIZE_KEY,
    Frontier,
    MerkleCorruptError,
    MerkleTree,
    leaf_hash,
    lmdb_tree,
    node_hash,
    node_key,
    verify_consistency,
    verify_inclusion,
)

VECTORS = Path(__file__).resolve().parents[1] / "vectors" / "merkle"  # provenance: tests/vectors/README.md
N = 70


# -- the public vectors (transparency-dev/merkle testdata) ---------------------------------------

def _b64(value: str | None) -> bytes:
    return base64.b64decode(value) if value else b""


def _vector_files(kind: str) -> list[Path]:
    files = sorted((VECTORS / kind).rglob("*.json"))
    assert files, f"no {kind} vectors under {VECTORS}"
    return files


def _vid(path: Path) -> str:
    return str(path.relative_to(VECTORS))


def test_vector_directories_are_all_collected():
    dirs = {p.parent.relative_to(VECTORS).as_posix() for p in VECTORS.rglob("*.json")}
    for expected in ("inclusion/single-entry", "inclusion/additional/0", "inclusion/additional/3",
                     "consistency/additional", "inclusion/4", "consistency/0"):
        assert expected in dirs
    assert len(_vector_files("inclusion")) + len(_vector_files("consistency")) == len(list(VECTORS.rglob("*.json")))


@pytest.mark.parametrize("path", _vector_files("inclusion"), ids=_vid)
def test_inclusion_vector(path: Path):
    v = json.loads(path.read_text())
    ok = verify_inclusion(_b64(v["leafHash"]), v["leafIdx"], v["treeSize"],
                          [_b64(p) for p in v["proof"] or []], _b64(v["root"]))
    assert ok is (not v["wantErr"]), v["desc"]


@pytest.mark.parametrize("path", _vector_files("consistency"), ids=_vid)
def test_consistency_vector(path: Path):
    v = json.loads(path.read_text())
    ok = verify_consistency(v["size1"], v["size2"], _b64(v["root1"]), _b64(v["root2"]),
                            [_b64(p) for p in v["proof"] or []])
    assert ok is (not v["wantErr"]), v["desc"]


def test_vector_happy_paths_are_reproduced_by_our_tree():
    """The vectors' leaves are RFC 6962's 8-entry test tree; our tree must produce their proofs."""
    leaves = [leaf_hash(bytes.fromhex(h)) for h in ("", "00", "10", "2021", "3031", "40414243",
                                                    "5051525354555657", "606162636465666768696a6b6c6d6e6f")]
    tree = dict_tree()[0]
    tree.extend(leaves)
    for path in _vector_files("inclusion"):
        v = json.loads(path.read_text())
        if v["desc"] == "happy path" and v["treeSize"] <= 8 and "additional" not in path.parts:
            assert tree.root(v["treeSize"]) == _b64(v["root"])
            assert tree.inclusion_proof(v["leafIdx"], v["treeSize"]) == [_b64(p) for p in v["proof"] or []]
    for path in _vector_files("consistency"):
        v = json.loads(path.read_text())
        if v["desc"] == "happy path":
            assert tree.consistency_proof(v["size1"], v["size2"]) == [_b64(p) for p in v["proof"] or []]


# -- an independent, straightforward RFC 6962 section 2.1 implementation ----------------------------

def ref_leaf(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def ref_mth(d: tuple[bytes, ...]) -> bytes:
    """MTH(D[n]) over leaf *inputs* (recursive definition, section 2.1)."""
    n = len(d)
    if n == 0:
        return hashlib.sha256(b"").digest()
    if n == 1:
        return ref_leaf(d[0])
    k = 1
    while k * 2 < n:
        k *= 2
    return hashlib.sha256(b"\x01" + ref_mth(d[:k]) + ref_mth(d[k:])).digest()


def ref_path(m: int, d: tuple[bytes, ...]) -> list[bytes]:
    """PATH(m, D[n]) (section 2.1.1)."""
    n = len(d)
    if n == 1:
        return []
    k = 1
    while k * 2 < n:
        k *= 2
    if m < k:
        return ref_path(m, d[:k]) + [ref_mth(d[k:])]
    return ref_path(m - k, d[k:]) + [ref_mth(d[:k])]


def ref_subproof(m: int, d: tuple[bytes, ...], b: bool) -> list[bytes]:
    """SUBPROOF(m, D[n], b) (section 2.1.2)."""
    n = len(d)
    if m == n:
        return [] if b else [ref_mth(d)]
    k = 1
    while k * 2 < n:
        k *= 2
    if m <= k:
        return ref_subproof(m, d[:k], b) + [ref_mth(d[k:])]
    return ref_subproof(m - k, d[k:], False) + [ref_mth(d[:k])]


def ref_proof(m: int, d: tuple[bytes, ...]) -> list[bytes]:
    return ref_subproof(m, d, True)


@cache
def data(n: int) -> tuple[bytes, ...]:
    return tuple(f"entry {i}".encode() * (i % 3 + 1) for i in range(n))


def dict_tree() -> tuple[MerkleTree, dict[bytes, bytes]]:
    table: dict[bytes, bytes] = {}
    return MerkleTree(table.get, table.__setitem__), table


@pytest.fixture(scope="module")
def built():
    tree, table = dict_tree()
    for i, item in enumerate(data(N)):
        assert tree.append(leaf_hash(item)) == i + 1
    return tree, table


def test_hash_primitives():
    assert EMPTY_ROOT.hex() == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert leaf_hash(b"abc") == hashlib.sha256(b"\x00abc").digest()
    assert node_hash(b"l" * 32, b"r" * 32) == hashlib.sha256(b"\x01" + b"l" * 32 + b"r" * 32).digest()
    assert node_key(3, 258) == b"m\x03" + (258).to_bytes(8, "big")
    assert len(node_key(0, 0)) == 10 and SIZE_KEY == b"msize"


def test_roots_match_reference_for_every_size(built):
    tree, _ = built
    assert tree.size() == N
    for n in range(N + 1):
        assert tree.root(n) == ref_mth(data(n)), n


def test_inclusion_proofs_match_reference_for_all_trees_up_to_n(built):
    tree, _ = built
    for n in range(1, N + 1):
        root = ref_mth(data(n))
        for m in range(n):
            proof = tree.inclusion_proof(m, n)
            assert proof == ref_path(m, data(n)), (m, n)
            assert verify_inclusion(ref_leaf(data(n)[m]), m, n, proof, root)
            assert not verify_inclusion(ref_leaf(data(n)[m]), (m + 1) % n, n, proof, root) or n == 1
            if proof:
                bad = list(proof)
                bad[-1] = bytes([bad[-1][0] ^ 1]) + bad[-1][1:]
                assert not verify_inclusion(ref_leaf(data(n)[m]), m, n, bad, root)
                assert not verify_inclusion(ref_leaf(data(n)[m]), m, n, proof[:-1], root)
            assert not verify_inclusion(ref_leaf(data(n)[m]), m, n, proof + [root], root)


def test_consistency_proofs_match_reference_for_all_trees_up_to_n(built):
    tree, _ = built
    for n in range(1, N + 1):
        new_root = ref_mth(data(n))
        for m in range(1, n + 1):
            proof = tree.consistency_proof(m, n)
            assert proof == ref_proof(m, data(n)), (m, n)
            old_root = ref_mth(data(m))
            assert verify_consistency(m, n, old_root, new_root, proof)
            if m < n:
                assert not verify_consistency(m, n, new_root, old_root, proof)
                assert not verify_consistency(m, n, old_root, new_root, proof[:-1])
                other = ref_mth(data(m - 1)) if m > 1 else b"\x00" * 32
                assert not verify_consistency(m, n, other, new_root, proof)


def test_bad_arguments_and_read_only_views(built):
    tree, _ = built
    with pytest.raises(ValueError):
        tree.root(N + 1)
    with pytest.raises(ValueError):
        tree.inclusion_proof(5, 5)
    with pytest.raises(ValueError):
        tree.consistency_proof(0, 4)
    with pytest.raises(ValueError):
        tree.consistency_proof(5, 4)
    with pytest.raises(ValueError):
        dict_tree()[0].append(b"short")
    assert dict_tree()[0].root() == EMPTY_ROOT
    assert tree.leaf(7) == leaf_hash(data(N)[7])
    assert tree.inclusion_proof(3) == tree.inclusion_proof(3, N)


def test_append_writes_about_two_nodes_per_leaf():
    tree, table = dict_tree()
    tree.extend(leaf_hash(d) for d in data(64))
    nodes = [k for k in table if k != SIZE_KEY]
    assert len(nodes) == 127  # 64 leaves + 63 complete interior nodes: 2n - 1
    assert all(len(k) == 10 and k[:1] == b"m" for k in nodes)


def test_damaged_table_is_reported_not_repaired():
    tree, table = dict_tree()
    tree.extend(leaf_hash(d) for d in data(10))
    del table[node_key(1, 2)]  # leaves 4..5
    assert tree.root(10)  # does not need that node
    with pytest.raises(MerkleCorruptError, match="leaves 4..5"):
        tree.root(6)
    with pytest.raises(MerkleCorruptError):
        tree.inclusion_proof(7, 10)
    with pytest.raises(MerkleCorruptError):
        tree.consistency_proof(7, 10)
    table[node_key(3, 0)] = b"short"
    with pytest.raises(MerkleCorruptError, match="level 3"):
        tree.root(8)
    table[SIZE_KEY] = b"\x01"
    with pytest.raises(MerkleCorruptError):
        tree.size()


def test_frontier_matches_reference():
    f = Frontier()
    assert f.root() == EMPTY_ROOT
    for i, item in enumerate(data(N)):
        f.append(leaf_hash(item))
        assert f.size == i + 1
        assert f.root() == ref_mth(data(i + 1))


def test_lmdb_backed_tree_equals_reference(tmp_path):
    env = lmdb.open(str(tmp_path / "db"), max_dbs=2, map_size=64 << 20)
    db = env.open_db(MERKLE_TABLE.encode())
    items = data(N)
    # appended across several write transactions, as the sign stage does batch by batch
    for start in range(0, N, 9):
        with env.begin(write=True) as txn:
            tree = lmdb_tree(txn, db)
            for item in items[start:start + 9]:
                tree.append(leaf_hash(item))
    # an aborted transaction leaves no trace
    txn = env.begin(write=True)
    lmdb_tree(txn, db).append(leaf_hash(b"never committed"))
    txn.abort()
    with env.begin() as txn:
        tree = lmdb_tree(txn, db, write=False)
        assert tree.size() == N
        for n in range(1, N + 1, 7):
            assert tree.root(n) == ref_mth(items[:n])
            for m in range(0, n, 3):
                assert tree.inclusion_proof(m, n) == ref_path(m, items[:n])
            for m in range(1, n + 1, 5):
                assert tree.consistency_proof(m, n) == ref_proof(m, items[:n])
        with pytest.raises(TypeError):
            tree.append(leaf_hash(b"x"))
    env.close()


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_random_sizes_against_reference(draw):
    n = draw.draw(st.integers(min_value=1, max_value=600), label="size")
    tree, _ = dict_tree()
    items = tuple(f"leaf-{n}-{i}".encode() for i in range(n))
    tree.extend(leaf_hash(x) for x in items)
    size = draw.draw(st.integers(min_value=1, max_value=n), label="tree size")
    index = draw.draw(st.integers(min_value=0, max_value=size - 1), label="index")
    old = draw.draw(st.integers(min_value=1, max_value=size), label="old size")
    root = ref_mth(items[:size])
    assert tree.root(size) == root
    proof = tree.inclusion_proof(index, size)
    assert proof == ref_path(index, items[:size])
    assert verify_inclusion(ref_leaf(items[index]), index, size, proof, root)
    cproof = tree.consistency_proof(old, size)
    assert cproof == ref_proof(old, items[:size])
    assert verify_consistency(old, size, ref_mth(items[:old]), root, cproof)
