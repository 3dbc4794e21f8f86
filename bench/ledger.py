"""Ledger benchmark: appends with Merkle maintenance, proof sizes and times, audit export/verify.

``run_ledger_bench(quick=False)`` measures, on real LMDB stores in a temporary directory:

- appends/s through the sign stage's real handler (``tests.support.sign.LocalSign``: entry
  bytes, Ed25519 signature, Merkle leaf and nodes, outbox row, receipts; one synced LMDB
  transaction per batch of ``stage.batch_max`` records), and the Merkle tree's own share;
- at 1,000,000 entries: inclusion and consistency proof size (hashes, bytes), build time and
  verification time (RFC 9162 algorithms, ``shared.ledger.merkle``);
- ``mro-edge audit export`` and ``mro-edge audit verify`` time for 100,000 entries (signature
  and chain verification of every entry, root recomputation, proofs).

Run: ``python -m bench.ledger [--quick]``. About 1.5 minutes in full, 20 s quick.
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lmdb

from shared.ledger.audit import export_audit, verify_audit
from shared.ledger.merkle import leaf_hash, lmdb_tree, verify_consistency, verify_inclusion
from shared.runtime.config import Config
from tests.support.sign import LocalSign, record_item

BATCH = 1000


def _appends(data: Path, n: int) -> dict[str, Any]:
    items = [record_item(i) for i in range(n)]
    sign = LocalSign(Config(data_dir=str(data)), map_size_mb=8192).open()
    try:
        start = time.perf_counter()
        for i in range(0, n, BATCH):
            sign.append(items[i : i + BATCH])
        elapsed = time.perf_counter() - start
        sign.checkpoint()
    finally:
        sign.close()
    return {"entries": n, "batch": BATCH, "seconds": round(elapsed, 2), "appends_per_s": round(n / elapsed)}


def _merkle_share(tmp: Path, n: int) -> dict[str, Any]:
    """The tree alone: appending ``n`` leaves in batches, as the sign stage does (no fsync)."""
    env = lmdb.open(str(tmp / "merkle-only"), map_size=1 << 34, sync=False, metasync=False, max_dbs=1)
    leaves = [leaf_hash(str(i).encode()) for i in range(n)]
    start = time.perf_counter()
    for i in range(0, n, BATCH):
        with env.begin(write=True) as txn:
            lmdb_tree(txn).extend(leaves[i : i + BATCH])
    elapsed = time.perf_counter() - start
    env.close()
    return {"leaves": n, "seconds": round(elapsed, 2), "leaves_per_s": round(n / elapsed)}


def _proofs(tmp: Path, size: int, samples: int) -> dict[str, Any]:
    env = lmdb.open(str(tmp / "tree"), map_size=1 << 36, sync=False, metasync=False, max_dbs=1)
    start = time.perf_counter()
    chunk = 50_000
    for i in range(0, size, chunk):
        with env.begin(write=True) as txn:
            lmdb_tree(txn).extend([hashlib.sha256(b"\x00" + j.to_bytes(8, "big")).digest()
                                   for j in range(i, min(size, i + chunk))])
    build_s = time.perf_counter() - start
    rng = random.Random(1)
    inclusion, consistency = [], []
    with env.begin() as txn:
        tree = lmdb_tree(txn, write=False)
        root = tree.root(size)
        for _ in range(samples):
            index = rng.randrange(size)
            leaf = tree.leaf(index)
            t0 = time.perf_counter()
            proof = tree.inclusion_proof(index, size)
            t1 = time.perf_counter()
            ok = verify_inclusion(leaf, index, size, proof, root)
            t2 = time.perf_counter()
            assert ok
            inclusion.append((len(proof), t1 - t0, t2 - t1))
            old = rng.randrange(1, size)
            old_root = tree.root(old)
            t0 = time.perf_counter()
            proof = tree.consistency_proof(old, size)
            t1 = time.perf_counter()
            ok = verify_consistency(old, size, old_root, root, proof)
            t2 = time.perf_counter()
            assert ok
            consistency.append((len(proof), t1 - t0, t2 - t1))
    env.close()

    def summary(rows: list[tuple[int, float, float]]) -> dict[str, Any]:
        hashes = [r[0] for r in rows]
        return {"hashes_max": max(hashes), "hashes_mean": round(sum(hashes) / len(hashes), 1),
                "bytes_max": 32 * max(hashes),
                "build_us_mean": round(1e6 * sum(r[1] for r in rows) / len(rows), 1),
                "verify_us_mean": round(1e6 * sum(r[2] for r in rows) / len(rows), 1)}

    return {"tree_size": size, "build_tree_s": round(build_s, 1), "samples": samples,
            "inclusion": summary(inclusion), "consistency": summary(consistency)}


def _export_verify(data: Path, out: Path, n: int) -> dict[str, Any]:
    config = Config(data_dir=str(data))
    start = time.perf_counter()
    summary = export_audit(config, out, seqs=[0, n // 2, n - 1])
    export_s = time.perf_counter() - start
    start = time.perf_counter()
    report = verify_audit(out)
    verify_s = time.perf_counter() - start
    assert report["entries"] == n
    size = (out / "entries.jsonl").stat().st_size
    return {"entries": n, "export_s": round(export_s, 1), "verify_s": round(verify_s, 1),
            "verify_entries_per_s": round(n / verify_s), "export_mb": round(size / 1e6, 1),
            "checkpoint": summary["checkpoint"]}


def run_ledger_bench(quick: bool = False) -> dict[str, Any]:
    """Run the ledger figures (see the module doc), print them, return them as a dict."""
    n_appends = 20_000 if quick else 100_000
    tree_size = 100_000 if quick else 1_000_000
    samples = 200 if quick else 1000
    with tempfile.TemporaryDirectory(prefix="mro-bench-ledger-") as tmp:
        base = Path(tmp)
        figures: dict[str, Any] = {
            "appends": _appends(base / "data", n_appends),
            "merkle_only": _merkle_share(base, n_appends),
            "proofs": _proofs(base, tree_size, samples),
            "audit": _export_verify(base / "data", base / "export", n_appends),
        }
    a, m, p, x = figures["appends"], figures["merkle_only"], figures["proofs"], figures["audit"]
    print(f"ledger appends (sign handler, Merkle on): {a['appends_per_s']:,}/s "
          f"({a['entries']:,} entries, batches of {a['batch']}, synced commits)")
    print(f"  Merkle tree alone: {m['leaves_per_s']:,} leaves/s")
    print(f"proofs at {p['tree_size']:,} entries (tree built in {p['build_tree_s']} s):")
    for kind in ("inclusion", "consistency"):
        s = p[kind]
        print(f"  {kind:<12} {s['hashes_mean']} hashes on average, at most {s['hashes_max']} "
              f"({s['bytes_max']} bytes); build {s['build_us_mean']} us, verify {s['verify_us_mean']} us")
    print(f"audit export of {x['entries']:,} entries: {x['export_s']} s ({x['export_mb']} MB); "
          f"verify: {x['verify_s']} s ({x['verify_entries_per_s']:,} entries/s)")
    return figures


if __name__ == "__main__":
    from shared.runtime.logs import configure_logging

    configure_logging("bench-ledger", "-", "WARNING")
    result = run_ledger_bench(quick="--quick" in sys.argv)
    if "--json" in sys.argv:
        print(json.dumps(result, indent=2))
